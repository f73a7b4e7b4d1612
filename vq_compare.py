"""vq_compare: an exact comparison of ways to train a linear VQ-VAE, in NumPy.

The model: an encoder ``W`` of shape (m, D) with orthonormal rows (a point on the
Stiefel manifold), a codebook ``E`` of shape (K, m) and the transposed decoder::

    Z = X @ W.T                        # (n, m) latents
    k = argmin_j ||z - e_j||^2,  Q = E[k]
    X_hat = Q @ W                      # (n, D)

trained on synthetic low-rank data (Gaussian, a Gaussian mixture or Laplace:
``--family``) or on the user's own array (``--data``) by every method of the registry
``METHODS``:
the k-means reference, the straight-through estimator with finite-difference (our
autograd stand-in) and hand-derived gradients, the rotation trick, an EMA codebook,
exact alternating minimisation, and the literature's tricks (NSVQ, DiVeQ, affine codebook
with synchronized commitment, SimVQ, Wasserstein matching, FSQ), each with its paper and
its authors' code named where it is declared. Every report carries the floors no method
can beat, references, and each model's error on a large fresh sample of the true
distribution (or the data's held-out test rows) with its standard error.

``python vq_compare.py`` runs the default comparison and writes ``results_out/``
(``--help`` lists the flags). Imported, or pasted whole into a notebook cell, the file
defines everything and runs nothing: then call ``run_comparison(...)``.

The file reads in the order the data flow: configuration and random streams; data
(synthetic families, and your own, mapped);
Stiefel geometry and PCA; the quantizer; losses and hand-derived gradients; finite
differences; metrics, floors and the population error; the problem and its start point;
the optimizer; the methods (each declares its parameters, loss and gradients) and their
registry; the one training loop; the one gradient checker; the comparison; reporting
and plots; the command line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import difflib
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import types
import zlib
from typing import Callable, NamedTuple

import numpy as np

# ------------------------------------------- Configuration and random streams


def _f(default, help, needs=None):
    """A field of :class:`Config`: its default, its help, and what it ``needs`` to matter:
    ``(other, values)`` another field's values, ``(other, None)`` another field on (not
    0), ``("methods", key)`` a method that reads it run (see :func:`contradiction`)."""
    return dataclasses.field(default=default, metadata={"help": help, "needs": needs})


def _field_doc(cls):
    """The docstring's Attributes section, from the fields' own declarations (so that
    ``help(Config)`` lists every setting with its type, default and meaning, and can
    never disagree with the command line's --help, which reads the same text)."""
    import textwrap
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        lines.append(f"{f.name} : {kind}, default {default!r}")
        lines += textwrap.wrap(f.metadata["help"], 88, initial_indent="    ", subsequent_indent="    ")
    section = textwrap.indent("\n".join(lines), "    ")
    cls.__doc__ = cls.__doc__.rstrip() + "\n\n    Attributes\n    ----------\n" + section
    return cls


@_field_doc
@dataclasses.dataclass
class Config:
    """Every setting of a comparison; the CLI flags are these field names (``--D 64``),
    ``make_config`` / ``run_comparison`` take them as keywords. Sizes are counts of
    samples or dimensions; ``D``, ``rank``, ``m`` and ``K`` fix the shapes: data (n, D),
    encoder W (m, D), codebook E (K, m), the true covariance of rank ``rank``."""
    D: int = _f(64, "ambient (data) dimension")
    rank: int = _f(6, "rank of the data covariance")
    m: int = _f(4, "latent dimension (rows of the encoder W)")
    K: int = _f(32, "codebook size")
    n_train: int = _f(20000, "training samples")
    n_eval: int = _f(4000, "held-out evaluation samples")
    steps: int = _f(200, "gradient steps of each gradient method (0: the start point only)")
    batch: int = _f(1024, "batch size (sampled with replacement from the training set)")
    fresh_batches: int = _f(0, "1: every batch drawn anew from the true distribution (a stream of its "
                               "own), no sample seen twice; 0: batches sampled from the training set",
                               needs=("data", ("",)))
    alpha: float = _f(1.0, "codebook-loss weight")
    beta: float = _f(0.25, "commitment-loss weight")
    lrW: float = _f(0.08, "encoder learning rate (on the Stiefel manifold, see --optimizer)")
    lrE: float = _f(0.2, "codebook learning rate (every parameter of a method's own)")
    lrV: float = _f(0.0, "untied decoder's learning rate (0: --lrW)", needs=("decoder", ("untied",)))
    optimizer: str = _f("sgd", "sgd, momentum (heavy ball), adam or adamw, for every trained parameter; "
                               "W takes its Riemannian version")
    momentum: float = _f(0.9, "momentum: the heavy-ball coefficient", needs=("optimizer", ("momentum",)))
    betas: tuple = _f((0.9, 0.999), "adam, adamw: decay of the first and second moment averages",
                      needs=("optimizer", ("adam", "adamw")))
    weight_decay: float = _f(0.0, "L2 penalty (sgd, momentum, adam) or decoupled decay (adamw); "
                                   "none on W, where the tangent space removes it")
    recipe: str = _f("shared", "shared: one optimizer and one set of loss weights for every method; "
                               "authors: each method with its authors' optimizer, loss reduction, "
                               "weights and knobs (the registry's recipes)")
    seed: int = _f(0, "seed of the data, k-means, batches and population sample")
    outdir: str = _f("", "output folder ('' writes nothing; the command line's default is results_out)")
    lmax: float = _f(4.0, "largest covariance eigenvalue", needs=("data", ("",)))
    lmin: float = _f(0.25, "smallest non-zero covariance eigenvalue", needs=("data", ("",)))
    family: str = _f("gaussian", "the synthetic data's distribution, of the same covariance: gaussian; "
                                 "mixture (Gaussian clusters in the directions PCA ranks last); laplace "
                                 "(heavy tails)", needs=("data", ("",)))
    data: str = _f("", "your own data instead: an .npy file of shape (N, D), or FILE.npz:NAME; mapped, "
                       "not loaded, and split by --seed into --n_train training, --n_eval eval and (at "
                       "most --n_pop) test rows, on which the population error is measured; D and the "
                       "rank are the data's")
    methods: tuple = _f((), "methods to run and report (empty: every registered method not marked opt-in)")
    quiet: bool = _f(False, "print nothing")
    ema_decay: float = _f(0.99, "ema_ste: decay of the codebook moving averages", needs=("methods", "ema_ste"))
    ema_eps: float = _f(1e-5, "ema_ste: Laplace smoothing of the cluster sizes", needs=("methods", "ema_ste"))
    start: str = _f("kmeans", "start of every trained method: kmeans (PCA encoder, converged "
                              "k-means codes), random_codes (PCA encoder, Gaussian codes at the "
                              "latents' scale), shifted (the same, mean offset by --shift), "
                              "random (random orthonormal encoder, Gaussian codes)")
    shift: float = _f(4.0, "shifted start: offset of the codes' mean, in latent standard deviations per latent coordinate",
                      needs=("start", ("shifted",)))
    train_encoder: int = _f(1, "1: train the encoder W; 0: W stays at its start, only the codebook learns")
    decoder: str = _f("tied", "tied: the decoder is W; untied: a free decoder V (m, D), started at W, "
                              "trained by every gradient method")
    dead_threshold: float = _f(0.0, "re-seed a code whose moving-average count per batch falls below "
                                    "this with a latent of the batch, every trained method (0 disables)")
    dead_decay: float = _f(0.8, "decay of the moving-average code counts for --dead_threshold",
                           needs=("dead_threshold", None))
    fsq_levels: tuple = _f((), "fsq: levels per latent dimension (empty: allotted by the start latents' "
                                "variances, at most K codes)", needs=("methods", "fsq"))
    replace_every: int = _f(0, "every this many steps, codes used in fewer than --replace_below of those "
                               "batches become copies of used codes (NSVQ's and DiVeQ's replacement; 0: off)")
    replace_below: float = _f(0.01, "--replace_every: the share of batches below which a code is replaced",
                              needs=("replace_every", None))
    lr_schedule: str = _f("constant", "learning rates along training: constant, cosine or linear "
                                      "(decay to zero over --steps)")
    tail_average: float = _f(0.0, "report the average of the iterates over this last fraction of "
                                  "the steps (0: the last iterate)")
    n_pop: int = _f(500_000, "fresh samples of the true distribution for the population error (0 disables)")
    practical: float = _f(0.001, "the verdict calls a difference smaller than this share of the baseline's "
                                 "error not practically different, however many samples separate it")
    n_init: int = _f(0, "k-means restarts, the lowest inertia kept (0: auto, 8 on small problems, "
                        "fewer as n_train x K grows)")
    kmeans_iter: int = _f(300, "Lloyd iterations per k-means restart at most")
    pl_rounds: int = _f(500, "procrustes_lloyd: rounds at most", needs=("methods", "procrustes_lloyd"))
    pl_tol: float = _f(1e-10, "procrustes_lloyd: stop when the relative improvement falls below this",
                       needs=("methods", "procrustes_lloyd"))
    log_every: int = _f(0, "evaluate eval-set metrics every this many steps (0: auto, about 20 points)")
    eval_every: int = _f(0, "at step 1 and every this many steps, the quantizer's metrics on --eval_samples "
                            "fresh samples of the true distribution (error, codes used, perplexity, W2); 0: off",
                            needs=("data", ("",)))
    eval_samples: int = _f(200_000, "--eval_every: fresh samples per evaluation (the same for every method)",
                           needs=("eval_every", None))
    dtype: str = _f("float64", "float64 (exact checks) or float32 (speed)")
    fd_h: float = _f(1e-5, "finite-difference step")
    fd_max_evals: float = _f(2e6, "skip fd_ste when steps x 2 x (parameters) loss evaluations exceed this",
                             needs=("methods", "fd_ste"))
    force_fd: bool = _f(False, "run fd_ste whatever its cost", needs=("methods", "fd_ste"))
    workers: int = _f(1, "processes for the independent k-means restarts (0: one per core, the "
                         "command line's default; 1: all in this process); results do not depend on it")
    method_params: dict = dataclasses.field(default_factory=dict, metadata={"help": (
        "the methods' own hyperparameters, flags --<method>_<name> (see the registry)")})


# One random stream per purpose, derived from the seed, so that adding a method or a
# restart never changes the numbers of another.
_STREAMS = {"kmeans": 1, "batches": 2, "population": 3, "unconstrained": 4,
            "reseed": 5, "gradcheck": 6, "start": 7, "curves": 8, "noise": 9, "validation": 10,
            "fresh": 11, "monitor": 12, "init": 13, "split": 14}


def derived_rng(seed, purpose):
    """Generator for one purpose (``"kmeans"``, ``"batches"``, ...) derived from ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAMS[purpose],)))


class Progress:
    """Progress lines on stderr, with the elapsed time and an estimate of what is left,
    for every phase that runs longer than ``after`` seconds (at most one line every
    ``every`` seconds); ``Progress(False)`` is silent. Called as ``progress(phase, done,
    total)`` by the long loops, ``progress(text)`` before a long single step."""

    def __init__(self, enabled=True, after=2.0, every=2.0, stream=None):
        self.enabled, self.after, self.every, self.stream = enabled, after, every, stream
        self.t0 = time.perf_counter()
        self.phase = None

    def __call__(self, phase, done=None, total=None):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done is None:
            print(f"[{now - self.t0:7.1f} s] {phase}", file=self.stream or sys.stderr, flush=True)
            return
        if phase != self.phase:
            self.phase, self.start, self.last = phase, now, now
        if now - self.start < self.after or now - self.last < self.every or not 0 < done < total:
            return
        self.last = now
        left = (now - self.start) / done * (total - done)
        print(f"[{now - self.t0:7.1f} s] {phase}: {done} of {total}, about {left:.0f} s left",
              file=self.stream or sys.stderr, flush=True)


def quiet(*_):
    """A progress callback that says nothing."""


# ----------------------------------------------------------------------- Data

def lowrank_factor(D, rank, seed, lmax=4.0, lmin=0.25, rng=None):
    """Eigenbasis ``U`` (D, rank) and eigenvalues ``lam`` (rank,) of the data covariance.

    ``Sigma = (U * lam) @ U.T``, the first draws of ``rng`` (default: a fresh generator
    from ``seed``), exactly as in :func:`make_lowrank_data` with the same arguments.
    """
    rng = np.random.default_rng(seed) if rng is None else rng
    U, _ = np.linalg.qr(rng.normal(size=(D, rank)))        # (D, rank) orthonormal basis
    lam = np.geomspace(lmax, lmin, rank)                    # (rank,) descending
    return U, lam


def make_lowrank_data(D, rank, n_train, n_eval, seed, lmax=4.0, lmin=0.25, progress=quiet):
    """Zero-mean Gaussian data with a rank-``rank`` covariance (the original recipe).

    Draws exactly what the original framework drew, in the same order
    (``rng.multivariate_normal`` for the training set, then for the eval set), so the
    same seed gives the same arrays: ``X_train`` (n_train, D), ``X_eval`` (n_eval, D) and
    ``Sigma`` (D, D), of eigenvalues ``geomspace(lmax, lmin, rank)`` and zeros.

    >>> Xt, Xe, S = make_lowrank_data(D=5, rank=2, n_train=3, n_eval=4, seed=0)
    >>> Xt.shape, Xe.shape, S.shape, int(np.linalg.matrix_rank(S))
    ((3, 5), (4, 5), (5, 5), 2)
    """
    rng = np.random.default_rng(seed)
    U, lam = lowrank_factor(D, rank, seed, lmax, lmin, rng)
    Sigma = (U * lam) @ U.T                                 # (D, D)
    if D >= 1024:
        progress(f"singular value decomposition of the {D} x {D} covariance (O(D^3): minutes for D in the thousands)")
    u, s, _ = np.linalg.svd(Sigma)                          # multivariate_normal's factor
    factor = u * np.sqrt(s)                                 # (D, D)
    return (_mvn_draw(rng, factor, n_train, progress), _mvn_draw(rng, factor, n_eval, progress), Sigma)


_DRAW_ROWS = 2048   # rows per block of the data draw: a few MB, in cache


def _mvn_draw(rng, factor, n, progress=quiet):
    """``rng.multivariate_normal(zeros(D), Sigma, size=n)`` in blocks of rows: the stream
    consumed in the same order, so the same numbers (to the last bit of another BLAS's
    products), with one n x D array plus a block where NumPy holds two n x D arrays."""
    D = factor.shape[0]
    out = np.empty((n, D))
    for a in range(0, n, _DRAW_ROWS):
        c = min(_DRAW_ROWS, n - a)
        np.matmul(rng.standard_normal((c, D)), factor.T, out=out[a:a + c])
        progress(f"drawing {n:,} samples", a + c, n)
    out += 0.0                                              # as NumPy's mean + ...: no -0.0
    return out


# Families beyond the Gaussian, drawn in the true eigenbasis (x = s U^T, s of variances
# lam): the same second moment, other shapes. The Gaussian is the hardest source of a
# given covariance, so its bounds are floors only for it; PCA's floor holds for every one.
FAMILIES = ("gaussian", "mixture", "laplace")
MIXTURE_CENTRES = 0.9   # share of a cluster coordinate's variance between the cluster centres


def mixture_coordinates(rank, m):
    """The coordinates that carry the mixture's clusters: from the m-th on (the last
    one PCA keeps and every one it drops), so that the cluster structure lies partly
    outside the top-m principal subspace."""
    return slice(max(m - 1, 0), rank)


def family_draw(family, rng, n, lam, m):
    """``n`` samples (n, rank) of ``family`` in the eigenbasis coordinates, coordinate i
    of mean 0 and variance ``lam[i]``, independent across coordinates:

    - ``gaussian``: N(0, lam_i);
    - ``laplace``: Laplace of scale sqrt(lam_i / 2) (heavier tails, the same variance);
    - ``mixture``: Gaussian in the coordinates before :func:`mixture_coordinates`; in
      those, each is +-a_i with equal odds plus N(0, w_i^2), a_i^2 = 0.9 lam_i,
      w_i^2 = 0.1 lam_i: a mixture of 2^c well-separated Gaussian clusters (c of them
      coordinates) that PCA, which sees only variances, ranks below the Gaussian ones.

    >>> S = family_draw("mixture", np.random.default_rng(0), 100_000, np.array([2.0, 1.0, 1.0]), 2)
    >>> np.round(S.var(axis=0), 1)
    array([2., 1., 1.])
    """
    if family == "laplace":
        return rng.laplace(0.0, np.sqrt(lam / 2), (n, len(lam)))
    S = rng.standard_normal((n, len(lam))) * np.sqrt(lam)
    if family == "mixture":
        c = mixture_coordinates(len(lam), m)
        signs = 2.0 * rng.integers(0, 2, (n, len(lam[c]))) - 1
        S[:, c] = signs * np.sqrt(MIXTURE_CENTRES * lam[c]) + S[:, c] * np.sqrt(1 - MIXTURE_CENTRES)
    return S


def laplace_lower_bound(lam, K):
    """Shannon's lower bound on the mean squared error (summed over coordinates) of any
    quantizer with K codes of independent Laplace coordinates of variances ``lam``:
    ``D >= r / (2 pi e) exp(2 (h - ln K) / r)``, h = sum_i (1 + ln(2 b_i)) nats, b_i =
    sqrt(lam_i / 2). (With Gaussian entropies in place of h it is :func:`shannon_bound`
    where no coordinate is dropped.)"""
    r = len(lam)
    h = float(np.sum(1 + np.log(2 * np.sqrt(np.asarray(lam) / 2))))
    return r / (2 * math.pi * math.e) * math.exp(2 * (h - math.log(K)) / r)


# --------------------------------------------------- Your own data (--data)

_SCAN_ROWS = 1 << 16     # rows per chunk when a mapped array is read through


class DataFile(NamedTuple):
    """A user's array, mapped: ``rows`` (N, D) as stored (never loaded whole), the
    sorted indices of the training, eval and test rows of its seeded split, and what
    summary.json says of it (path, shape, dtype, SHA-256 of its values)."""
    rows: np.ndarray
    train: np.ndarray
    eval: np.ndarray
    test: np.ndarray
    about: dict


def _bad_data(path, reason):
    return ConfigError("data", path, reason)


def _npz_member(path, name):
    """An array stored in an .npz, memory-mapped when stored uncompressed (np.savez),
    loaded when compressed and small enough; ``name`` None: the only array."""
    import zipfile
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise _bad_data(path, f"not a readable .npz ({e})") from None
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if name is None and len(names) != 1:
            raise _bad_data(path, f"holds {len(names)} arrays ({', '.join(names)}): name one as "
                                  f"{path}:NAME") from None
        name = names[0] if name is None else name
        if name not in names:
            raise _bad_data(f"{path}:{name}", f"no array {name!r} in it (it holds {', '.join(names)})")
        info = zf.getinfo(name + ".npy")
        with zf.open(info) as fh:                          # the .npy header, read through the zip
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise _bad_data(f"{path}:{name}", f".npy format {version}: save it with numpy.savez")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            header = fh.tell()
        if info.compress_type == zipfile.ZIP_STORED:       # bytes as they lie in the file: mapped
            with open(path, "rb") as raw:
                raw.seek(info.header_offset + 26)
                skip = int.from_bytes(raw.read(2), "little") + int.from_bytes(raw.read(2), "little")
            offset = info.header_offset + 30 + skip + header
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")
        need, have = math.prod(shape) * dtype.itemsize, available_memory()
        if have is not None and need > have // 2:
            raise _bad_data(f"{path}:{name}", f"compressed, so it cannot be mapped, and at {_bytes(need)} too "
                                              f"large to load ({_bytes(have)} available): save it with "
                                              "numpy.save or numpy.savez (uncompressed)")
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh)


def data_label(data):
    """How reports and summary.json name ``data``: its path, or an array's shape."""
    return f"<array {data.shape[0]} x {data.shape[1]}>" if isinstance(data, np.ndarray) else data


def open_data(spec, check=True):
    """The array of ``--data`` (an .npy file, or FILE.npz[:NAME]) memory-mapped and
    checked: 2-D, floating point, every value finite (a NumPy array given to the
    library is checked the same way; ``check=False``: not read through again, once the
    settings have been checked). Raises :class:`ConfigError` in one line naming what is
    wrong (for non-finite values: how many rows, the first)."""
    if isinstance(spec, np.ndarray):
        return _checked(spec, f"<array of shape {spec.shape}>", check)
    path, name = spec, None
    if ".npz:" in spec:
        path, name = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise _bad_data(spec, "no such file")
    if path.endswith(".npz"):
        X = _npz_member(path, name)
    else:
        try:
            X = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise _bad_data(spec, f"not a .npy array file ({str(e).splitlines()[0]})") from None
        if not isinstance(X, np.ndarray):
            raise _bad_data(spec, "holds several arrays: an .npz? name one as FILE.npz:NAME")
    return _checked(X, spec, check)


def _checked(X, spec, scan=True):
    if X.ndim != 2:
        raise _bad_data(spec, f"shape {X.shape}: must be 2-D (N rows, D columns)")
    if X.dtype.kind != "f":
        raise _bad_data(spec, f"dtype {X.dtype}: must be floating point")
    bad, first = 0, None
    for a in range(0, X.shape[0] if scan else 0, _SCAN_ROWS):
        rows = ~np.isfinite(X[a:a + _SCAN_ROWS]).all(axis=1)
        if rows.any():
            first = a + int(np.argmax(rows)) if first is None else first
            bad += int(rows.sum())
    if bad:
        raise _bad_data(spec, f"{bad:,} row{'s' if bad > 1 else ''} with NaN or infinite values, "
                              f"the first at row {first}")
    return X


def data_sizes(N, settings):
    """(n_train, n_eval, n_test) of a split of N rows: the given sizes, else 60% and 20% of
    the rows (at most the defaults); the test rows are the rest, at most ``n_pop``."""
    base = Config()
    n_train = settings.get("n_train") or min(base.n_train, 3 * N // 5)
    n_eval = settings.get("n_eval") or min(base.n_eval, N // 5)
    n_pop = settings.get("n_pop", base.n_pop)
    return n_train, n_eval, min(N - n_train - n_eval, n_pop)


def checksum(X):
    """SHA-256 of the values of ``X``, row by row: an array in memory and the same array
    in a file have the same."""
    import hashlib
    sha = hashlib.sha256()
    for i in range(0, X.shape[0], _SCAN_ROWS):
        sha.update(np.ascontiguousarray(X[i:i + _SCAN_ROWS]).tobytes())
    return sha.hexdigest()


def split_data(X, cfg, spec):
    """The seeded split of the rows of ``X`` (its own stream): distinct rows drawn at
    random, the first n_train for training, the next n_eval for eval, the rest (at most
    n_pop) for test; each set sorted, so mapped rows are read in file order. Only the
    rows drawn are held (not a permutation of all N: a file may have billions)."""
    N = X.shape[0]
    n_test = min(N - cfg.n_train - cfg.n_eval, cfg.n_pop)
    pick = derived_rng(cfg.seed, "split").choice(N, size=cfg.n_train + cfg.n_eval + n_test, replace=False)
    a, b = cfg.n_train, cfg.n_train + cfg.n_eval
    about = {"path": data_label(spec), "shape": list(X.shape), "dtype": str(X.dtype), "sha256": checksum(X)}
    return DataFile(X, np.sort(pick[:a]), np.sort(pick[a:b]), np.sort(pick[b:]), about)


def gather(X, idx, dtype):
    """Rows ``idx`` of a (mapped) array, as a new ``dtype`` array, chunk by chunk."""
    out = np.empty((len(idx), X.shape[1]), dtype=dtype)
    for a in range(0, len(idx), _SCAN_ROWS):
        out[a:a + _SCAN_ROWS] = X[idx[a:a + _SCAN_ROWS]]
    return out


def second_moment_basis(X, idx, progress=quiet):
    """Eigenvectors U (D, D) and eigenvalues (descending) of the second moment
    ``mean x x^T`` of rows ``idx``: the data's own spectrum. With no bias in the model,
    the second moment (not the covariance) is what a rank-m reconstruction loses."""
    D = X.shape[1]
    M = np.zeros((D, D))
    for a in range(0, len(idx), _SCAN_ROWS):
        progress("the held-out rows' spectrum", a, len(idx))
        R = gather(X, idx[a:a + _SCAN_ROWS], np.float64)
        M += R.T @ R
    lam, U = np.linalg.eigh(M / max(len(idx), 1))
    return U[:, ::-1].copy(), np.maximum(lam[::-1], 0.0)


# --------------------------------------------------- Stiefel geometry and PCA

def stiefel_project(W):
    """Polar factor of ``W`` (m, D), m <= D: the nearest matrix with orthonormal rows.

    Examples
    --------
    >>> stiefel_project(np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    array([[1., 0., 0.],
           [0., 1., 0.]])
    """
    U, _, Vt = np.linalg.svd(W, full_matrices=False)        # (m, m), (m,), (m, D)
    return U @ Vt                                           # (m, D)


def tangent(W, G):
    """The projection of ``G`` (m, D) onto the tangent space of the Stiefel manifold at ``W``."""
    sym = G @ W.T                                           # (m, m)
    return G - 0.5 * (sym + sym.T) @ W


def riemannian_step(W, G, lr):
    """One Riemannian SGD step on the Stiefel manifold: the Euclidean gradient ``G``
    (m, D) projected onto the tangent space at ``W``, the step, the polar retraction."""
    return stiefel_project(W - lr * tangent(W, G))


def subspace_angle_deg(W, U_m):
    """Largest principal angle (degrees) between the row space of ``W`` (m, D) and span(U_m).

    ``U_m`` (D, m) has orthonormal columns. The sine form is accurate for small angles.
    """
    Wo = stiefel_project(W)
    resid = Wo - (Wo @ U_m) @ U_m.T                         # (m, D) part outside span(U_m)
    return float(np.degrees(np.arcsin(min(1.0, np.linalg.norm(resid, 2)))))


# Multiply-adds of one block's product in latents, the nearest-code search and k-means++:
# a product this small runs on one BLAS thread (OpenBLAS threads larger ones), so k-means
# restarts on parallel processes do not oversubscribe the cores, and on a busy machine no
# BLAS thread of the training loop waits for a core (a batch's products are too small for
# threads to pay); the (rows x K) distances stay in cache and memory does not grow with n.
_PRODUCT = 1 << 18


def _block_rows(width):
    return max(1, _PRODUCT // max(1, width))


def latents(X, W):
    """The latents ``Z = X W^T`` (n, m) of the rows of ``X`` (n, D), computed as
    ``(W X^T)^T`` (the same products, which BLAS runs faster for tall ``X``) in blocks of
    rows of at most ``_PRODUCT`` multiply-adds each (see there).

    >>> latents(np.arange(6.0).reshape(3, 2), np.array([[1.0, -1.0]])).ravel()
    array([-1., -1., -1.])
    """
    rows = _block_rows(W.shape[0] * X.shape[1])
    if X.shape[0] <= rows:
        return (W @ X.T).T
    out = np.empty((W.shape[0], X.shape[0]), dtype=np.result_type(X, W))
    for s in range(0, X.shape[0], rows):
        np.matmul(W, X[s:s + rows].T, out=out[:, s:s + rows])
    return out.T                                            # (n, m), Fortran-ordered


def t_dot(A, X):
    """``A^T X`` (p, D) of ``A`` (n, p) and ``X`` (n, D), summed over blocks of rows of at
    most ``_PRODUCT`` multiply-adds (see there): a batch's gradients and statistics."""
    rows = _block_rows(A.shape[1] * X.shape[1])
    if A.shape[0] <= rows:
        return A.T @ X
    return sum(A[s:s + rows].T @ X[s:s + rows] for s in range(0, A.shape[0], rows))


def pca_encoder(X, m):
    """Top-m eigenvectors of the second-moment matrix ``X^T X / n`` as rows (m, D).

    The model has no bias, so the uncentred second moment is the right matrix (the
    data are zero-mean). Each row's sign makes its largest entry positive.
    """
    C = (X.T @ X) / X.shape[0]                              # (D, D)
    _, vecs = np.linalg.eigh(C)
    W = vecs[:, ::-1][:, :m].T                              # (m, D) descending eigenvalues
    sign = np.sign(W[np.arange(m), np.argmax(np.abs(W), axis=1)])
    return np.ascontiguousarray(W * sign[:, None])


# ----------- Quantizer: nearest code, Lloyd, k-means++, k-means with restarts

# Rows of a block of the nearest-code search when a block of _PRODUCT multiply-adds holds
# fewer (large K): the block's products are then split over the codes, and its (rows x K)
# distances stay in a core's cache while their row minima are taken.
_SEARCH_ROWS = 16
# Below this many (point, code) pairs the full search is cheap: no pruning is tried.
_PRUNE_FROM = 1 << 24


def nearest(Z, E, second=False):
    """Nearest code of every row of ``Z`` (n, m) in ``E`` (K, m), exactly, in bounded memory.

    Returns ``labels`` (n,) and ``dist`` (n,), the squared distance to that code; with
    ``second=True`` also the squared distance to the second-nearest code (inf when K = 1).
    Ties go to the lower index (to rounding: codes whose computed distances differ by less
    than their rounding error are equally near). The search compares ``||e||^2 - 2 z.e``
    (``||z||^2`` is the same for every code), both terms from one product with ``z``
    augmented by a 1, over cache-sized blocks of rows. Large searches are pruned first
    (:func:`_nearest_pruned`: codes that cannot be nearest are never compared). In
    float32, rows whose two nearest codes are closer than float32 can tell apart are
    searched again in float64, so the labels are those of the float64 search.

    Examples
    --------
    >>> nearest(np.array([[0.0], [0.9], [2.2]]), np.array([[0.0], [2.0]]))
    (array([0, 0, 1]), array([0.  , 0.81, 0.04]))
    """
    if not second and Z.shape[0] * E.shape[0] >= _PRUNE_FROM:
        found = _nearest_pruned(Z, E)
        if found is not None:
            return found
    return _nearest_full(Z, E, second)


def _augmented(E, dtype):
    """``[-2 E^T; ||e||^2]`` (m + 1, K): ``[z, 1] @`` it gives ``||e||^2 - 2 z.e``."""
    A = np.empty((E.shape[1] + 1, E.shape[0]), dtype=dtype)
    A[:-1] = -2.0 * E.T
    A[-1] = np.einsum("km,km->k", E, E, dtype=np.float64)
    return A


def _products(Za, A, out):
    """``out = Za @ A`` ((c, w) from (c, m + 1) and (m + 1, w)) in column tiles of at most
    ``_PRODUCT`` multiply-adds each: one BLAS thread each (see there)."""
    cols = max(1, _PRODUCT // max(1, Za.shape[0] * Za.shape[1]))
    for k in range(0, A.shape[1], cols):
        np.matmul(Za, A[:, k:k + cols], out=out[:, k:k + cols])
    return out


# From this many codes a search for the nearest code alone screens in float32 (see
# _nearest_full): the product and the row minima take half the memory traffic.
_SCREEN_FROM = 256


def _nearest_full(Z, E, second=False, screen=None):
    """:func:`nearest` comparing every code with every point, in blocks of rows.

    ``screen`` (default: for the nearest code alone, from ``_SCREEN_FROM`` codes, values
    within float32's range): the distances are computed in float32, and the rows whose
    runner-up lies within float32's rounding of the best are searched again in float64,
    so the labels are those of the float64 search; the distances returned are then
    computed directly, ``||z - e||^2`` in float64. Without it the search runs in the
    inputs' precision.
    """
    n, m = Z.shape
    K = E.shape[0]
    dtype = np.result_type(Z, E)
    if screen is None:
        screen = not second and K >= _SCREEN_FROM and (dtype == np.float32 or (
            np.all(np.isfinite(E)) and float(np.max(np.abs(E), initial=0.0)) < 1e15
            and float(np.max(np.abs(Z), initial=0.0)) < 1e15))
    work = np.float32 if screen else dtype
    A = _augmented(E, work)                                  # (m + 1, K)
    z_sq = np.einsum("nm,nm->n", Z, Z)
    dist = z_sq.astype(work)                                 # ||z||^2, added at the end
    labels = np.empty(n, dtype=np.intp)
    dist2 = np.empty(n, work) if second or screen else None
    rows = max(1, min(n, max(_SEARCH_ROWS, _PRODUCT // ((m + 1) * K))))
    Za = np.empty((rows, m + 1), work)
    Za[:, m] = 1.0
    out = np.empty((rows, K), work)
    idx = np.arange(rows)
    for s in range(0, n, rows):
        c = min(rows, n - s)
        Za[:c, :m] = Z[s:s + c]
        d = _products(Za[:c], A, out[:c])                   # (c, K) ||e||^2 - 2 z.e
        lab = d.argmin(axis=1)
        labels[s:s + c] = lab
        i = idx[:c]
        best = d[i, lab]
        if dist2 is not None:
            d[i, lab] = np.inf
            dist2[s:s + c] = (d.min(axis=1) if K > 1 else np.inf) + dist[s:s + c]
        dist[s:s + c] += best
    if screen:
        # a float32 distance is off by at most (m + 3) u (||z|| + ||e||)^2 with
        # ||e|| <= 2 ||z|| + ||z - e||: rows whose runner-up is within twice that of the
        # best are searched again in float64
        z = np.sqrt(z_sq, dtype=np.float64)
        d1 = np.maximum(dist.astype(np.float64), 0)
        tol = 2.02 * (m + 3) * float(np.finfo(np.float32).eps) * (2 * z + np.sqrt(d1) + 1e-30) ** 2
        redo = np.flatnonzero(~(dist2 - d1 > tol))
        if redo.size:
            labels[redo] = _nearest_full(Z[redo].astype(np.float64), E.astype(np.float64), screen=False)[0]
        diff = Z.astype(np.float64) - E[labels]
        return labels, np.einsum("nm,nm->n", diff, diff).astype(dtype, copy=False)
    np.maximum(dist, 0, out=dist)                           # rounding can dip below zero
    if second:
        return labels, dist, np.maximum(dist2, 0, out=dist2)
    return labels, dist


_PROBES = 4     # codes next to a point in the projection's order whose distances bound its nearest


def _nearest_pruned(Z, E, sample=1024):
    """:func:`nearest` for many points and codes, comparing a point only with the codes
    that can be its nearest; None when too few codes can be ruled out to pay.

    The bound: for a unit vector ``u``, ``|u.z - u.e| <= ||z - e||``. With ``u`` along the
    difference of the points' and the codes' means and the codes sorted by ``u.e``, a
    point whose distance to some code is ``r`` can only be nearest to codes with ``u.e``
    in ``[u.z - r, u.z + r]``, a contiguous run of the sorted codes; ``r`` comes from the
    ``_PROBES`` codes next to ``u.z`` in that order. Points are taken in the order of
    their runs, in blocks that share one (the union of theirs). When the codes lie away from the data (a
    shifted start, codes abandoned by training) almost every code is ruled out; when
    they lie among the data none is, and the full search runs (decided on ``sample``
    points first). Rounding is allowed for on both the projections and the distances,
    so the labels are those of the full search (to rounding, see :func:`nearest`).
    Float32 inputs are searched in float64 here (few pairs are left to compare).
    """
    n, m = Z.shape
    K = E.shape[0]
    Z64, E64 = Z.astype(np.float64, copy=False), E.astype(np.float64, copy=False)
    u = Z64.mean(axis=0) - E64.mean(axis=0)
    norm = np.linalg.norm(u)
    if not norm > 0:
        return None
    u /= norm
    pe = np.einsum("km,m->k", E64, u)                       # no BLAS: a matrix-vector product threads
    order = np.argsort(pe, kind="stable")
    pe, Es = pe[order], E64[order]                          # codes in the order of u.e
    z_sq = np.einsum("nm,nm->n", Z64, Z64)
    e_max = float(np.sqrt(np.max(np.einsum("km,km->k", E64, E64))))
    z_max = float(np.sqrt(np.max(z_sq)))
    # the projections' rounding, and the computed distances', with room
    slack_p = 4 * (m + 2) * np.finfo(np.float64).eps * (z_max + e_max)
    slack_d = _distance_eps(E64, z_max ** 2)

    def windows(rows):
        pz = np.einsum("nm,m->n", Z64[rows], u)
        pos = np.searchsorted(pe, pz)
        ub = np.full(len(pz), np.inf)
        for off in range(-(_PROBES // 2), _PROBES - _PROBES // 2):
            diff = Z64[rows] - Es[np.clip(pos + off, 0, K - 1)]
            np.minimum(ub, np.einsum("nm,nm->n", diff, diff), out=ub)
        r = np.sqrt(ub + slack_d) * (1 + 1e-12) + slack_p
        return pz, np.searchsorted(pe, pz - r, "left"), np.searchsorted(pe, pz + r, "right")

    probe = np.linspace(0, n - 1, min(n, sample)).astype(np.intp)
    _, lo, hi = windows(probe)
    if (hi - lo).mean() > K / 4:                            # too little to rule out: search all
        return None
    pz, lo, hi = windows(slice(None))
    if (hi - lo).mean() > K / 4:
        return None
    zo = np.lexsort((pz, lo))                               # points in the order of their runs
    # blocks short enough that a block's points share most of their runs
    rows = max(16, min(256, n // 64, int(_PRODUCT // ((m + 1) * max(1.0, float(np.mean(hi - lo)))))))
    starts = np.arange(0, n, rows)
    lo, hi = np.minimum.reduceat(lo[zo], starts), np.maximum.reduceat(hi[zo], starts)   # per block
    if np.sum((hi - lo) * np.minimum(rows, n - starts)) > n * K / 4:   # the blocks' runs overlap
        return None                                         # too much: the full search is faster
    A = _augmented(Es, np.float64)                          # (m + 1, K) in the codes' order
    labels, dist = np.empty(n, dtype=np.intp), np.empty(n)
    Za = np.ones((n, m + 1))
    Za[:, :m] = Z64
    for s, a, b in zip(starts, lo, hi):
        pts = zo[s:s + rows]
        d = _products(Za[pts], A[:, a:b], np.empty((len(pts), b - a)))   # (c, b - a)
        k = d.argmin(axis=1)
        labels[pts] = order[a + k]
        dist[pts] = z_sq[pts] + d[np.arange(len(pts)), k]
    np.maximum(dist, 0, out=dist)
    return labels, dist.astype(np.result_type(Z, E), copy=False)


def assign(Z, E):
    """Index (n,) of the nearest code in ``E`` (K, m) for each row of ``Z`` (n, m)."""
    return nearest(Z, E)[0]


def cluster_sums(Z, labels, K):
    """Per-cluster counts (K,) and float64 sums (K, m) of the rows of ``Z`` (n, m)."""
    counts = np.bincount(labels, minlength=K)
    sums = np.empty((K, Z.shape[1]))
    for j in range(Z.shape[1]):                             # m passes of O(n), no (n, K) one-hot
        sums[:, j] = np.bincount(labels, weights=Z[:, j], minlength=K)
    return counts, sums


def centroids(Z, labels, dist, E_old):
    """Lloyd's update step: every centre moves to the mean of its cluster.

    An empty cluster takes the point farthest from its centre (scikit-learn's rule),
    never emptying another cluster. Returns the new centres (K, m) in E_old's dtype.
    """
    K = E_old.shape[0]
    counts, sums = cluster_sums(Z, labels, K)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        far = np.argsort(-dist, kind="stable")[:empty.size]
        for j, i in zip(empty, far):
            if counts[labels[i]] > 1:
                counts[labels[i]] -= 1
                sums[labels[i]] -= Z[i]
                counts[j], sums[j] = 1, Z[i]
    E = E_old.astype(np.float64, copy=True)
    has = counts > 0
    E[has] = sums[has] / counts[has, None]
    return E.astype(E_old.dtype, copy=False)


class LloydResult(NamedTuple):
    E: np.ndarray        # (K, m) centres
    labels: np.ndarray   # (n,) nearest centre of each point, for the returned E
    inertia: float       # sum of squared distances to the returned centres
    n_iter: int          # centre updates made
    seconds: float = 0.0  # compute time where it ran (seeding included)


def lloyd_plain(Z, E_init, max_iter=300):
    """Textbook Lloyd: assign every point, move the centres, until no label changes.

    The definition that :func:`lloyd` computes faster; kept as the reference for tests.
    """
    E = np.array(E_init, dtype=np.result_type(Z, E_init), copy=True)
    prev, n_iter = None, 0
    for _ in range(max_iter):
        labels, dist = nearest(Z, E)
        if prev is not None and np.array_equal(labels, prev):
            break
        E = centroids(Z, labels, dist, E)
        prev, n_iter = labels, n_iter + 1
    labels, dist = nearest(Z, E)
    return LloydResult(E, labels, float(dist.sum()), n_iter)


_SAFE = 1e-9   # relative slack on the accumulated centre drift


def _distance_eps(E, z_max):
    """A bound on the rounding error of a computed squared distance between a point of
    squared norm at most ``z_max`` and a row of ``E``."""
    return 4 * (E.shape[1] + 2) * np.finfo(E.dtype).eps * (
        z_max + float(np.max(np.einsum("km,km->k", E, E))) + 1e-300)


def lloyd(Z, E_init, max_iter=300):
    """Lloyd's algorithm (k-means) from ``E_init``: :func:`lloyd_plain`, with less work.

    Exact, but it skips points that cannot change cluster (Hamerly's bound): a point
    was ``g`` closer to its own centre than to any other; since then its own centre
    moved by ``a`` and the farthest-moving centre by ``b``; while ``a + b < g`` it keeps
    its centre (triangle inequality, with the rounding error of the distances taken off
    ``g``). The centres are recomputed from full sums each iteration, so they are those
    of :func:`lloyd_plain` (tested, float64 and float32). ``Z`` (n, m), ``E_init`` (K, m),
    ``max_iter`` centre updates at most; returns ``LloydResult(E, labels, inertia, n_iter)``.

    Examples
    --------
    >>> Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> r = lloyd(Z, np.array([[1.0, 0.0], [9.0, 0.0]]))
    >>> r.E, r.labels, r.inertia
    (array([[ 0. ,  0.5],
           [10. ,  0.5]]), array([0, 0, 1, 1]), 1.0)
    """
    E = np.array(E_init, dtype=np.result_type(Z, E_init), copy=True)
    K = E.shape[0]
    Zf = np.ascontiguousarray(Z.T).T   # a copy with contiguous columns, for the cluster sums
    z_max = float(np.max(np.einsum("nm,nm->n", Z, Z), initial=0.0))
    labels = gap = None
    own = np.zeros(K)                  # each centre's accumulated drift since the bounds were set
    drift = 0.0                        # the same for the farthest mover
    for it in range(max_iter + 1):
        # assignment: every point at first (and after a relocation), else only those
        # whose bound has expired
        cand = None if gap is None else np.flatnonzero(own[labels] + drift > gap)
        sub = Z if cand is None else Z[cand]
        lab, d1, d2 = nearest(sub, E, second=True)
        eps = _distance_eps(E, z_max)
        new_gap = np.sqrt(np.maximum(d2 - eps, 0)) - np.sqrt(d1 + eps)
        if cand is None:
            moved = labels is None or not np.array_equal(lab, labels)
            labels, gap = lab, new_gap + own[lab] + drift
        else:
            moved = bool(np.any(lab != labels[cand]))
            labels[cand] = lab
            gap[cand] = new_gap + own[lab] + drift
        if (it > 0 and not moved) or it == max_iter:
            break                                           # stable: E are the means of their clusters
        dist = None
        if np.bincount(labels, minlength=K).min() == 0:     # a relocation moves a point without a bound
            dist = np.sum((Z - E[labels]) ** 2, axis=1)
            gap = None
        E_new = centroids(Zf, labels, dist, E)
        step = np.sqrt(np.sum((E_new.astype(np.float64) - E) ** 2, axis=1))   # (K,) moves
        own += step * (1 + _SAFE)
        drift += float(np.max(step)) * (1 + _SAFE)
        E = E_new
    labels, dist = nearest(Z, E)
    return LloydResult(E, labels, float(dist.sum()), it)


def kmeans_plusplus(Z, K, rng):
    """Greedy k-means++ seeding (2 + ln K candidates per centre). Returns (K, m)."""
    n = Z.shape[0]
    trials = 2 + int(np.log(K))
    z_sq = np.einsum("nm,nm->n", Z, Z)
    centres = np.empty((K, Z.shape[1]), dtype=Z.dtype)
    first = rng.integers(n)
    centres[0] = Z[first]
    closest = np.maximum(z_sq - 2 * np.einsum("nm,m->n", Z, Z[first]) + z_sq[first], 0)   # (n,)
    d = np.empty((trials, n), dtype=Z.dtype)
    rows = _block_rows(trials * Z.shape[1])
    for c in range(1, K):
        total = closest.sum()
        if total > 0:
            cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=trials) * total)
            cand = np.minimum(cand, n - 1)
        else:                                               # fewer distinct points than K
            cand = rng.integers(n, size=trials)
        Zc = Z[cand]                                        # (t, m)
        for s in range(0, n, rows):
            np.matmul(Zc, Z[s:s + rows].T, out=d[:, s:s + rows])   # (t, rows)
        d *= -2
        d += z_sq[cand][:, None]
        d += z_sq                                           # (t, n) squared distances
        np.maximum(d, 0, out=d)
        np.minimum(d, closest, out=d)                       # potential if the candidate is added
        best = int(np.argmin(d.sum(axis=1)))
        centres[c] = Zc[best]
        closest = d[best].copy()
    return centres


def kmeans_restart(Z, K, rng, max_iter, init=None):
    """One k-means restart: k-means++ seeding from ``rng`` (or the centres ``init``),
    then Lloyd; its ``seconds`` are measured where it runs."""
    t0 = time.perf_counter()
    r = lloyd(Z, kmeans_plusplus(Z, K, rng) if init is None else init, max_iter)
    return r._replace(seconds=time.perf_counter() - t0)


def restart_args(Z, K, rng, n_init, max_iter):
    """Arguments of ``n_init`` calls of :func:`kmeans_restart`: restart i draws from the
    i-th generator spawned from ``rng``, wherever it runs."""
    return [(Z, K, r, max_iter) for r in rng.spawn(max(1, n_init))]


def best_run(runs):
    """The restart with the lowest inertia (the first of equals)."""
    return min(runs, key=lambda r: r.inertia)


def kmeans(Z, K, seed=0, n_init=8, max_iter=300, workers=1):
    """k-means: ``n_init`` k-means++ starts, Lloyd from each, the lowest inertia kept.

    ``Z`` (n, m); ``1 <= K <= n``; ``seed`` an int or a Generator; ``max_iter`` centre
    updates per restart at most; ``workers`` processes for the restarts (see
    :func:`process_pool`: the result does not depend on it). Returns the best restart's
    ``LloydResult(E (K, m), labels (n,), inertia, n_iter, seconds)``.

    Examples
    --------
    >>> Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> E = kmeans(Z, 2, seed=0).E
    >>> E[np.argsort(E[:, 0])]
    array([[ 0. ,  0.5],
           [10. ,  0.5]])
    """
    n = Z.shape[0]
    if not 1 <= K <= n:
        raise ValueError(f"n_samples={n} should be >= K={K} >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    with process_pool(workers) as pool:
        futures = [pool.submit(kmeans_restart, *a) for a in restart_args(Z, K, rng, n_init, max_iter)]
        return best_run([f.result() for f in futures])


class _InProcess(concurrent.futures.Executor):
    """The executor interface, running each task at once in this process."""
    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)
        return future


def _spawnable(fn):
    """Can a fresh interpreter import ``fn``? Not when this code was pasted into a
    notebook cell or an interactive session (no file defines it), nor when the main
    script has no file (read from stdin): a spawned process re-runs the main script."""
    def defined_in_file(module):
        path = getattr(module, "__file__", None)
        return path is None or os.path.isfile(path)
    module = sys.modules.get(fn.__module__)
    path = getattr(module, "__file__", None)
    return (path is not None and os.path.abspath(path) == os.path.abspath(fn.__code__.co_filename)
            and defined_in_file(sys.modules.get("__main__")))


@contextlib.contextmanager
def process_pool(workers):
    """An executor over ``workers`` fresh processes (0: one per core), closed when the
    block ends; this process itself (an in-process executor) when ``workers`` is 1 or
    when a fresh interpreter could not import this code (pasted into a notebook). For
    independent tasks on small arrays (k-means restarts, sweep cells): arguments and
    results are pickled; results never depend on where a task runs."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or not _spawnable(kmeans_restart):
        yield _InProcess()
        return
    pool = _Pool(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_leave_interrupts_to_the_caller)
    try:
        yield pool
    except BaseException:           # Ctrl-C, an error: queued tasks dropped, running ones end
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class _Pool(concurrent.futures.ProcessPoolExecutor):
    """A process pool whose workers never die of Ctrl-C. Workers are started by
    ``submit``; while one starts, this thread holds Ctrl-C back (blocked, not lost: it
    arrives when ``submit`` returns), and the worker, which inherits the blocked signal,
    cannot be interrupted while it imports, before its initializer ignores it."""
    def submit(self, fn, /, *args, **kwargs):
        if not hasattr(signal, "pthread_sigmask"):           # no POSIX signal masks (Windows)
            return super().submit(fn, *args, **kwargs)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().submit(fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _leave_interrupts_to_the_caller():
    """A worker ignores Ctrl-C (the terminal sends it to every process of the job): the
    caller stops, reports in one line and shuts the pool down. A Ctrl-C held back while
    the worker started is dropped with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


# -------------------- Losses, the frozen surrogate and hand-derived gradients

def own_codes(assign, Z, E):
    """Labels (n,) and squared distances (n,) of a quantizer with its own assignment rule
    ``assign(Z) -> labels`` (FSQ's rounding): not always the nearest code."""
    labels = assign(Z)
    diff = Z - E[labels]
    return labels, np.einsum("nm,nm->n", diff, diff)


def reconstruction_errors(x_sq, Z, E, W, assigned=None, V=None, Y=None):
    """Per-sample ``||x - q W||^2`` (n,), labels (n,) and in-subspace ``||z - q||^2`` (n,)
    of the model (W, E), from the latents ``Z = X W^T`` (n, m) and ``x_sq = ||x||^2`` (n,);
    ``assigned``: the (labels, squared distances) of the nearest codes, when known. No
    (n, D) reconstruction is formed: ``||x - qW||^2 = ||x||^2 - ||z||^2 + ||z - q||^2 +
    (||qW||^2 - ||q||^2)``, the out-of-subspace residual plus the distortion (the last
    term is zero for orthonormal rows, rounding aside); with an untied decoder ``V`` (m, D)
    and ``Y = X V^T``, ``||x - qV||^2 = ||x||^2 - 2 y.q + ||qV||^2``.
    """
    labels, dist = nearest(Z, E) if assigned is None else assigned
    if V is not None:
        EV = E @ V                                          # (K, D)
        return x_sq - 2 * np.einsum("nm,nm->n", Y, E[labels]) + np.einsum("kd,kd->k", EV, EV)[labels], labels, dist
    EW = E @ W                                              # (K, D)
    corr = np.einsum("kd,kd->k", EW, EW) - np.einsum("km,km->k", E, E)   # (K,)
    return x_sq - np.einsum("nm,nm->n", Z, Z) + dist + corr[labels], labels, dist


class Grads(NamedTuple):
    loss: float          # surrogate (= true) loss at (W, E)
    gW: np.ndarray       # (m, D) Euclidean gradient
    gE: np.ndarray       # (K, m)
    gV: np.ndarray = None  # (m, D) the untied decoder's, when there is one


ESTIMATORS = ("ste", "rotation", "rotation_unit", "nsvq", "diveq")


class Frozen(NamedTuple):
    """Everything the surrogate treats as a constant (stop-gradient), for one batch.

    The estimator's output ``q~``, with ``R v = v - 2 r (r.v) + 2 q_hat (z_hat.v)``:

    * ``ste``: ``q~ = z + C``, ``C = sg(q - z)`` (``lam = 1``, R = I);
    * ``rotation`` (Fifty et al. 2025, their Table-1 code and lucidrains' ``rotate_to``):
      ``q~ = sg(lam R) z``, ``lam = ||q||/||z||``;
    * ``rotation_unit`` (their VQGAN code): ``q~ = sg(||q|| R) z/||z||``, the gradient
      flowing through the normalised latent;
    * ``nsvq``, ``diveq``: ``q~ = z + ||z - q|| u`` with the direction ``u`` frozen;
    * with ``nu`` (STE only): ``q~ = z + sg(q - z) + nu q - sg(nu q)``, the synchronized
      commitment of Huh et al. (ICML 2023; vqtorch ``VectorQuant.straight_through_approximation``):
      forward value q, the code receives ``nu`` times the gradient reaching q~.
    """
    labels: np.ndarray   # (B,) assignments k
    Z0: np.ndarray       # (B, m) sg(z)
    Q0: np.ndarray       # (B, m) sg(e_k)
    lam: np.ndarray      # (B,) scale
    r: np.ndarray        # (B, m) Householder direction
    q_hat: np.ndarray    # (B, m)
    z_hat: np.ndarray    # (B, m)
    C: np.ndarray        # (B, m) constant offset
    n_fallback: int      # samples using STE (all of them for estimator='ste')
    kind: str = "ste"    # the estimator
    u: np.ndarray = None  # (B, m) unit directions of nsvq / diveq
    nu: float = 0.0      # synchronized commitment: q~ += nu (q - sg(q)), Huh et al. 2023


_DEGENERATE = 1e-8   # ||z_hat + q_hat|| below this: rotation undefined, STE fallback


def freeze(W, E, X, estimator="ste", rng=None, noise=1e-3, nu=0.0):
    """The frozen quantities of the surrogate at (W, E) for the batch ``X`` (B, D).

    Rotation trick (Fifty et al. 2025, eq. 4): ``q~ = sg(lam R) z`` with
    ``lam = ||q||/||z||`` and ``R = I - 2 r r^T + 2 q_hat z_hat^T``, so ``lam R z = q``.
    Where ``z = 0``, ``q = 0`` or ``q_hat = -z_hat`` (to within 1e-8) the rotation is
    undefined and that sample uses STE.

    NSVQ (Vali and Backstrom 2022; ``NSVQ.forward`` in MHVali/Noise-Substitution-in-Vector-
    Quantization): ``u = v/(||v|| + 1e-12)``, ``v ~ N(0, I)`` from ``rng``, fresh per
    sample. DiVeQ (Vali, Backstrom and Solin; ``DIVEQ.forward`` in AaltoML/DiVeQ):
    ``u = sg(d + eps)/||d + eps||``, ``d = q - z``, ``eps ~ N(0, noise^2 I)``; the authors'
    ``noise_var = 1e-3`` is used as a standard deviation, as their code does;
    ``noise=0`` is their DiVeQ-Detach.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} should be one of {', '.join(ESTIMATORS)}")
    Z = latents(X, W)                                       # (B, m)
    labels = assign(Z, E)
    Q = E[labels]                                           # (B, m)
    B = Z.shape[0]
    zeros = np.zeros_like(Z)
    if estimator in ("ste", "nsvq", "diveq"):
        u = None
        if estimator == "nsvq":
            v = rng.standard_normal(Z.shape)
            u = v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
        elif estimator == "diveq":
            v = Q - Z + (noise * rng.standard_normal(Z.shape) if noise > 0 else 0.0)
            u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return Frozen(labels, Z, Q, np.ones(B, Z.dtype), zeros, zeros, zeros, Q - Z, B, estimator,
                      None if u is None else u.astype(Z.dtype), nu if estimator == "ste" else 0.0)
    z_norm = np.linalg.norm(Z, axis=1)
    q_norm = np.linalg.norm(Q, axis=1)
    ok = (z_norm > 0) & (q_norm > 0)
    z_hat = np.divide(Z, z_norm[:, None], out=np.zeros_like(Z), where=ok[:, None])
    q_hat = np.divide(Q, q_norm[:, None], out=np.zeros_like(Q), where=ok[:, None])
    s = z_hat + q_hat
    s_norm = np.linalg.norm(s, axis=1)
    ok &= s_norm > _DEGENERATE
    r = np.divide(s, s_norm[:, None], out=np.zeros_like(s), where=ok[:, None])
    lam = np.divide(q_norm, z_norm, out=np.ones_like(z_norm), where=ok)
    fb = ~ok[:, None]
    return Frozen(labels, Z, Q, lam, np.where(fb, 0, r), np.where(fb, 0, q_hat),
                  np.where(fb, 0, z_hat), np.where(fb, Q - Z, 0), int((~ok).sum()), estimator)


def rotation_matrices(fr):
    """Per-sample ``lam R`` of shape (B, m, m); the identity for STE samples."""
    m = fr.Z0.shape[1]
    R = np.eye(m, dtype=fr.Z0.dtype) - 2 * fr.r[:, :, None] * fr.r[:, None, :] \
        + 2 * fr.q_hat[:, :, None] * fr.z_hat[:, None, :]           # (B, m, m)
    return fr.lam[:, None, None] * R


def surrogate_loss(W, E, X, fr, alpha, beta, V=None):
    """The frozen surrogate, evaluated from its definition; W and E may be stacks.

    ``L = mean ||x - q~ W||^2 + alpha mean ||sg(z) - e_k||^2 + beta mean ||z - sg(e_k)||^2``
    with ``q~`` from :class:`Frozen` ``fr``; at the point where ``fr`` was built its value
    is the true loss. W (m, D), E (K, m) and the untied decoder V (None: the decoder is W,
    else ``x^ = q~ V``) may each be a stack (P, ...): then the P values, else a float.
    """
    B, D = X.shape
    Ws = W.reshape((-1,) + W.shape[-2:])                    # (P, m, D)
    P, m, _ = Ws.shape
    Z = (X @ Ws.reshape(P * m, D).T).reshape(B, P, m)       # (B, P, m): one product for all P
    Es = E.reshape((-1,) + E.shape[-2:])                    # (P_E, K, m)
    Q = np.swapaxes(Es[:, fr.labels, :], 0, 1)              # (B, P_E, m) live codes
    if fr.kind in ("ste", "rotation"):
        A = Z @ np.swapaxes(rotation_matrices(fr), 1, 2) + fr.C[:, None, :]   # (B, P, m) q~
        if fr.nu:
            A = A + fr.nu * (Q - fr.Q0[:, None, :])
    elif fr.kind == "rotation_unit":                        # ||q0|| R z/||z||, STE where degenerate
        R = rotation_matrices(fr) / fr.lam[:, None, None]
        q_norm = np.linalg.norm(fr.Q0, axis=1)[:, None, None]
        A = np.where(fr.r.any(axis=1)[:, None, None],
                     q_norm * (Z / np.linalg.norm(Z, axis=2, keepdims=True)) @ np.swapaxes(R, 1, 2),
                     Z + fr.C[:, None, :])
    else:                                                   # nsvq, diveq: z + ||z - q|| u
        A = Z + np.linalg.norm(Z - Q, axis=2, keepdims=True) * fr.u[:, None, :]
    Vs = Ws if V is None else V.reshape((-1,) + V.shape[-2:])   # (P_V, m, D) the decoder
    Y = Z if V is None else (X @ Vs.reshape(-1, D).T).reshape(B, -1, m)   # (B, P_V, m) x V^T
    A = np.broadcast_to(A, np.broadcast_shapes(A.shape, Y.shape))
    # sum_b ||x - a V||^2 = ||X||^2 - 2 sum_b (x V^T).a + <A^T A, V V^T>: no (B, P, D) array
    AtA = np.transpose(A, (1, 2, 0)) @ np.transpose(A, (1, 0, 2))      # (P, m, m)
    VVt = Vs @ np.swapaxes(Vs, 1, 2)                        # (P, m, m)
    recon = (np.sum(X * X) - 2 * np.einsum("bpm,bpm->p", np.broadcast_to(Y, A.shape), A)
             + np.sum(AtA * VVt, axis=(1, 2))) / B          # (P,)
    commit = np.sum((Z - fr.Q0[:, None, :]) ** 2, axis=(0, 2)) / B
    codebook = np.sum((fr.Z0 - E[..., fr.labels, :]) ** 2, axis=(-2, -1)) / B
    out = recon + beta * commit + alpha * np.reshape(codebook, -1)
    if W.ndim == 2 and E.ndim == 2 and (V is None or V.ndim == 2):
        return float(out[0])
    return out


def manual_grads(W, E, X, alpha, beta, estimator="ste", frozen=None, rng=None, nu=0.0, V=None):
    """Loss and hand-derived Euclidean gradients of the batch surrogate at (W, E).

    Forward, then backward through the named intermediates in reverse::

        Z = X W^T, Q = E[k], q~ (forward value Q), X_t = q~ W
        recon = mean ||X - X_t||^2,  dX_t = -2/B (X - X_t)
        gW  = q~^T dX_t                      (decoder path)
        dq~ = dX_t W^T
        dZ  = dq~ (STE)  or  lam R^T dq~ (rotation);  + 2 beta/B (Z - Q)
        gW += dZ^T X                         (encoder path)
        gE_j = 2 alpha/B sum_{i in j} (e_j - z_i)   (batch mean, not cluster mean)

    The (B, D) matrices X_t and dX_t are never formed: with ``G = W W^T`` (m, m),
    ``dX_t W^T = -2/B (Z - Q G)`` and ``Q^T dX_t = -2/B (Q^T X - Q^T Q W)``.

    Parameters
    ----------
    W : ndarray of shape (m, D); E : ndarray of shape (K, m); X : ndarray of shape (B, D)
    alpha, beta : float; estimator : one of :data:`ESTIMATORS` (see :class:`Frozen`)
    frozen : the :func:`freeze` of (W, E, X, estimator) when the caller has it already
    rng : the noise of nsvq and diveq, when ``frozen`` is not given
    V : the untied decoder (m, D), or None when the decoder is W: then ``x^ = q~ V``, W
        gets the encoder path only and ``gV = 2/B F^T (F V - X)``

    With ``F`` the forward value of q~ (``Q``, or ``z + ||z - q|| u`` for nsvq and diveq)
    and ``g`` the gradient reaching it, every estimator sends ``g J`` to z and ``g H`` to
    its code (``J = dq~/dz``, ``H = dq~/dq``): STE ``J = I``; rotation ``lam R``;
    rotation_unit ``lam R (I - z_hat z_hat^T)``; nsvq and diveq ``J = I + u w^T``,
    ``H = -u w^T``, ``w = (z - q)/||z - q||`` (``H = 0`` where ``z = q``).

    Returns
    -------
    Grads(loss, gW (m, D), gE (K, m)), a named tuple, in the dtype of the inputs.
    """
    fr = freeze(W, E, X, estimator, rng, nu=nu) if frozen is None else frozen
    B = X.shape[0]
    Z, Q = fr.Z0, fr.Q0                                     # (B, m)
    dZQ = Z - Q                                             # (B, m)
    F = Q                                                   # forward value of q~
    if fr.kind in ("nsvq", "diveq"):
        n = np.linalg.norm(dZQ, axis=1, keepdims=True)      # (B, 1)
        F = Z + n * fr.u                                    # a point at distance ||z - q|| from z
    Dec = W if V is None else V                             # the decoder: x^ = q~ Dec
    Y = Z if V is None else latents(X, V)                   # (B, m) x Dec^T
    FG = F @ (Dec @ Dec.T)                                  # (B, m)
    recon = np.einsum("bd,bd->", X, X) - 2 * np.einsum("bm,bm->", Y, F) + np.einsum("bm,bm->", FG, F)
    loss = (float(recon) + (alpha + beta) * float(np.einsum("bm,bm->", dZQ, dZQ))) / B
    g = (-2.0 / B) * (Y - FG)                               # (B, m) gradient reaching q~
    c = None                                                # (B, m) its share reaching e_k
    if fr.kind == "ste":
        dZ = g                                              # straight through
        if fr.nu:
            c = fr.nu * g                                   # synchronized commitment: H = nu I
    elif fr.kind in ("rotation", "rotation_unit"):          # lam R^T g = lam (g - 2r(r.g) + 2 z_hat(q_hat.g))
        rg = np.sum(fr.r * g, axis=1, keepdims=True)
        qg = np.sum(fr.q_hat * g, axis=1, keepdims=True)
        # through z/||z||: the radial part is projected out, J = lam R (I - z_hat z_hat^T)
        dZ = fr.lam[:, None] * (g - 2 * fr.r * rg + (1 if fr.kind == "rotation_unit" else 2) * fr.z_hat * qg)
        if fr.kind == "rotation_unit" and fr.n_fallback:    # STE where the rotation is undefined
            dZ = np.where(fr.r.any(axis=1)[:, None], dZ, g)
    else:                                                   # J = I + u w^T, H = -u w^T, w = (z-q)/n
        w = np.divide(dZQ, n, out=np.zeros_like(dZQ), where=n > 0)
        gu = np.sum(g * fr.u, axis=1, keepdims=True)
        dZ, c = g + gu * w, -gu * w
    dZ = dZ + (2.0 * beta / B) * dZQ
    # decoder path F^T dX_t = 2/B (F^T F Dec - F^T X): the untied decoder's gradient; the
    # tied W takes it with the encoder path, (dZ - 2/B F)^T X + 2/B F^T F W
    if V is None:
        gW, gDec = t_dot(dZ - (2.0 / B) * F, X) + ((2.0 / B) * (F.T @ F)) @ W, None   # (m, D)
    else:
        gW, gDec = t_dot(dZ, X), ((2.0 / B) * (F.T @ F)) @ V - t_dot((2.0 / B) * F, X)
    counts, sums = cluster_sums(Z, fr.labels, E.shape[0])
    gE = (2.0 * alpha / B) * (counts[:, None] * E - sums)
    if c is not None:
        gE = gE + cluster_sums(c, fr.labels, E.shape[0])[1]
    return Grads(float(loss), gW, gE.astype(E.dtype, copy=False), gDec)


# -------- Finite differences: the autograd stand-in (evaluates the loss only)

def _perturbed(P, idx, delta):
    """A stack (len(idx), *P.shape) of copies of ``P``, copy i with flat entry idx[i] + delta."""
    stack = np.repeat(P.reshape(1, -1), len(idx), axis=0)
    stack[np.arange(len(idx)), idx] += delta
    return stack.reshape((len(idx),) + P.shape)


def central_differences(loss, point, h=1e-5, coords=None, block=256):
    """Central differences of ``loss`` over the entries of every named array of ``point``.

    The one finite-difference routine: the autograd stand-in of ``fd_ste`` and the
    gradient check of every method use it. ``loss(values)`` takes a dict like ``point``
    (float64 arrays) in which one array is replaced by a stack (P, *shape) of perturbed
    copies and returns the P losses, so each block of ``block`` perturbations is a few
    large products rather than many small ones. The loss must be evaluated from its
    definition (never from the hand-derived gradients, or nothing is checked).
    ``coords``: None for every entry, or name -> flat indices (the rest come back NaN).
    Returns name -> gradient, each of the shape of ``point[name]``.

    >>> f = lambda p: np.sum(p["a"] ** 3, axis=-1) + 2 * p["b"][..., 0]
    >>> g = central_differences(f, {"a": np.array([1.0, 2.0]), "b": np.array([5.0])}, h=1e-4)
    >>> np.round(g["a"], 6), np.round(g["b"], 6)
    (array([ 3., 12.]), array([2.]))
    """
    out = {}
    for name, P in point.items():
        idx = np.arange(P.size) if coords is None else np.asarray(coords[name])
        g = np.full(P.size, np.nan)
        for s in range(0, len(idx), block):
            i = idx[s:s + block]
            up = loss({**point, name: _perturbed(P, i, h)})
            down = loss({**point, name: _perturbed(P, i, -h)})
            g[i] = (np.asarray(up) - np.asarray(down)) / (2 * h)
        out[name] = g.reshape(P.shape)
    return out


class SteStats(NamedTuple):
    """Sufficient statistics of one batch for the frozen STE surrogate (float64)."""
    B: int
    trxx: float          # tr(X^T X)
    Sxx: np.ndarray      # (D, D) X^T X
    Sxc: np.ndarray      # (D, m) X^T C, C = sg(q - z)
    Scc: np.ndarray      # (m, m) C^T C
    Sxq: np.ndarray      # (D, m) X^T Q0
    qq: float            # ||Q0||^2
    counts: np.ndarray   # (K,) cluster sizes
    sums: np.ndarray     # (K, m) per-code sums of Z0
    zz: float            # ||Z0||^2


def ste_stats(X, fr, K):
    counts, sums = cluster_sums(fr.Z0, fr.labels, K)
    Sxx = t_dot(X, X)
    return SteStats(X.shape[0], float(np.trace(Sxx)), Sxx, X.T @ fr.C, fr.C.T @ fr.C,
                    X.T @ fr.Q0, float(np.sum(fr.Q0 ** 2)), counts, sums, float(np.sum(fr.Z0 ** 2)))


def ste_surrogate(W, E, st, alpha, beta):
    """The frozen STE surrogate through the batch's statistics, in O(m D^2) instead of
    O(B D) (tested equal to :func:`surrogate_loss`); W (…, m, D) or E (…, K, m) may be
    stacks. With ``M = W Sxx W^T``, ``N = W Sxc``, ``G = W W^T`` and ``A = X W^T + C``
    (the rows are q~)::

        sum ||x - a W||^2 = tr(Sxx) - 2 tr(M) - 2 tr(N) + <A^T A, G>,  A^T A = M + N + N^T + Scc
        sum ||z - sg(q)||^2 = tr(M) - 2 tr(W Sxq) + ||Q0||^2
        sum ||sg(z) - e_k||^2 = ||Z0||^2 - 2 <E, sums> + sum_j counts_j ||e_j||^2
    """
    Wt = np.swapaxes(W, -1, -2)
    M, N, G = (W @ st.Sxx) @ Wt, W @ st.Sxc, W @ Wt         # (…, m, m) each
    trM, trN = np.trace(M, axis1=-2, axis2=-1), np.trace(N, axis1=-2, axis2=-1)
    recon = st.trxx - 2 * trM - 2 * trN + np.sum((M + N + np.swapaxes(N, -1, -2) + st.Scc) * G, axis=(-2, -1))
    commit = trM - 2 * np.einsum("...md,dm->...", W, st.Sxq) + st.qq
    codebook = st.zz - 2 * np.sum(E * st.sums, axis=(-2, -1)) + np.einsum("k,...km->...", st.counts, E * E)
    return (recon + alpha * codebook + beta * commit) / st.B


def fd_grads(W, E, X, alpha, beta, estimator="ste", h=1e-5, coords=None, frozen=None, V=None):
    """Gradients of the frozen surrogate by :func:`central_differences` over W, E (and V).

    The stand-in for autograd: the quantities of :class:`Frozen` (given as ``frozen``,
    the noise of nsvq and diveq included, or frozen here at (W, E)) stay fixed while each
    entry moves by +-h, in float64; the gradients come back in the dtype of W and E as
    ``Grads(loss, gW, gE, gV)``. The plain STE loss is evaluated through the batch's
    sufficient statistics (:func:`ste_surrogate`), every other from its definition
    (:func:`surrogate_loss`). ``coords``: see :func:`central_differences` ("W", "E", "V").
    """
    out_dtype = np.result_type(W, E)
    W, E, X = (np.asarray(a, dtype=np.float64) for a in (W, E, X))   # differences need float64
    fr = freeze(W, E, X, estimator) if frozen is None else frozen
    point = {"W": W, "E": E} if V is None else {"W": W, "E": E, "V": np.asarray(V, dtype=np.float64)}
    if fr.kind == "ste" and not fr.nu and V is None:
        st = ste_stats(X, fr, E.shape[0])

        def loss(p):
            return ste_surrogate(p["W"], p["E"], st, alpha, beta)
        block = max(1, (1 << 22) // (W.size + E.size))
    else:
        def loss(p):
            return surrogate_loss(p["W"], p["E"], X, fr, alpha, beta, p.get("V"))
        block = max(1, (1 << 20) // (X.shape[0] * W.shape[0] + 1))
    g = central_differences(loss, point, h, coords, block)
    gV = None if V is None else g["V"].astype(out_dtype)
    return Grads(float(loss(point)), g["W"].astype(out_dtype), g["E"].astype(out_dtype), gV)


def rel_err(a, b):
    """Largest entry-wise difference relative to the largest entry: max|a-b| / max|b|.

    NaN entries of ``a`` (coordinates not computed) are ignored.
    """
    mask = ~np.isnan(a)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a[mask] - b[mask]), initial=0.0)) / scale


# ----------------------------------- Metrics, floors and the population error

def usage_stats(labels, K):
    """``usage_entropy`` (nats), ``perplexity`` and ``dead_frac`` of a labelling."""
    counts = np.bincount(labels, minlength=K)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-np.sum(p * np.log(p)))
    return {"usage_entropy": entropy, "perplexity": math.exp(entropy),
            "dead_frac": float(np.mean(counts == 0))}


def metrics(W, E, X, x_sq=None, V=None, assign=None):
    """Reconstruction and code-usage metrics of the model (W, E) on ``X`` (n, D).

    Returns a dict: ``recon_mse`` = mean ||x - q W||^2, ``in_sub_dist`` = mean
    ||z - q||^2, ``usage_entropy`` (nats), ``perplexity`` = exp(entropy), ``dead_frac``.
    ``x_sq``: the rows' squared norms (n,), when the caller has them; ``V``: an untied
    decoder (m, D), else the decoder is W.

    Examples
    --------
    >>> W = np.array([[1.0, 0.0]])            # keep the first coordinate
    >>> E = np.array([[-1.0], [1.0]])
    >>> X = np.array([[-1.0, 1.0], [2.0, 0.0]])
    >>> {k: round(v, 4) for k, v in metrics(W, E, X).items()}
    {'recon_mse': 1.0, 'in_sub_dist': 0.5, 'usage_entropy': 0.6931, 'perplexity': 2.0, 'dead_frac': 0.0}
    """
    x_sq = np.einsum("nd,nd->n", X, X, dtype=np.float64) if x_sq is None else x_sq
    Z = latents(X, W)
    err, labels, dist = reconstruction_errors(x_sq, Z, E, W, None if assign is None else own_codes(assign, Z, E),
                                              V=V, Y=None if V is None else latents(X, V))
    return {"recon_mse": float(err.mean()), "in_sub_dist": float(dist.mean()),
            **usage_stats(labels, E.shape[0])}


def pca_floor(lam, m):
    """Error of the best m-dimensional subspace: the sum of eigenvalues beyond the m-th.

    >>> pca_floor([4.0, 2.0, 1.0], 1)
    3.0
    """
    lam = np.sort(np.asarray(lam, dtype=float))[::-1]
    return float(lam[m:].sum())


def distortion_rate(lam, bits):
    """Gaussian distortion-rate function D(R) of N(0, diag(lam)) at ``bits`` (reverse
    water-filling): ``D = sum_i min(theta, lam_i)`` with
    ``sum_i max(0, log2(lam_i/theta)/2) = bits``. No quantizer whose index carries
    ``bits`` bits (a K-point one: log2 K; one whose index has entropy H: H) does better.

    >>> distortion_rate([1.0], 1)               # one component: lam / 4^R
    0.25
    >>> round(distortion_rate([4.0, 1.0], 2), 6)  # both components active: theta = 0.5
    1.0
    """
    lam = np.asarray(lam, dtype=float)
    lam = lam[lam > 0]
    if bits <= 0 or lam.size == 0:
        return float(lam.sum())

    def rate(theta):
        return float(np.sum(np.maximum(0.0, 0.5 * np.log2(lam / theta))))

    lo, hi = float(lam.max()) * 2.0 ** (-2 * bits), float(lam.max())   # rate(lo) >= bits >= rate(hi)
    for _ in range(200):                                    # bisection in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if rate(mid) > bits else (lo, mid)
        if hi - lo <= 1e-15 * hi:
            break
    active = lam[lam > hi]
    if active.size == 0:
        active = lam[lam >= lo]
    # closed form on the active set: sum log2(lam_i / theta) = 2 bits
    theta = 2.0 ** ((np.sum(np.log2(active)) - 2 * bits) / active.size)
    return float(np.sum(np.minimum(theta, lam)))


def shannon_bound(lam, K):
    """The full-spectrum Shannon bound: no K-point quantizer of N(0, diag(lam)) has a
    smaller mean squared error than ``distortion_rate(lam, log2 K)``."""
    return distortion_rate(lam, math.log2(K))


def rank_m_bound(lam, m, K=None, bits=None):
    """The Shannon bound of a rank-m VQ-VAE: no decoder of rank m with K codes (or an
    index of ``bits`` bits of entropy) beats the residual beyond the top m eigenvalues
    plus the distortion-rate function of those m at log2 K bits. Tighter than
    :func:`shannon_bound`, which lets the codes use every direction.

    >>> lam = np.geomspace(4, 0.25, 6)
    >>> round(rank_m_bound(lam, 4, K=32), 6), round(shannon_bound(lam, 32), 6)
    (1.91642, 1.899385)
    """
    top = np.sort(np.asarray(lam, dtype=float))[::-1]
    return pca_floor(top, m) + distortion_rate(top[:m], math.log2(K) if bits is None else bits)


# Normalised second moments G_m of the best known lattice quantizers (Conway & Sloane):
# dimensions without an entry have no tabulated lattice here; 1/(2 pi e) is the limit.
LATTICE_G = {1: 1 / 12, 2: 0.080188, 3: 0.078543, 4: 0.076603, 5: 0.075625, 6: 0.074244,
             7: 0.073113, 8: 0.071682, 12: 0.070034, 16: 0.068299, 24: 0.065771}


def zador_approximation(lam, m, K):
    """High-resolution (Zador) approximation of the error of the best rank-m quantizer
    with K codes: the residual beyond the top m eigenvalues plus
    ``m G_m 2 pi ((m+2)/m)^((m+2)/2) det(Sigma_m)^(1/m) K^(-2/m)``, with G_m of the best
    known lattice (1/(2 pi e) beyond m = 24; None where no lattice is tabulated). An
    approximation, not a bound: at small K it lies above the optimum.

    >>> round(zador_approximation([1.0], 1, 16) * 16 ** 2, 4)   # Panter-Dite: sqrt(3) pi / 2
    2.7207
    """
    G = LATTICE_G.get(m, 1 / (2 * math.pi * math.e) if m > 24 else None)
    if G is None:
        return None
    top = np.sort(np.asarray(lam, dtype=float))[::-1]
    log_det = float(np.sum(np.log(top[:m])))
    part = m * G * 2 * math.pi * ((m + 2) / m) ** ((m + 2) / 2) * math.exp(log_det / m) * K ** (-2 / m)
    return pca_floor(top, m) + part


class Population(NamedTuple):
    """Errors of several models on one fresh sample of the true distribution."""
    names: list
    mean: np.ndarray     # (M,) population recon_mse estimates
    se: np.ndarray       # (M,) standard errors
    cov: np.ndarray      # (M, M) covariance of the per-sample errors (paired comparisons)
    n: int

    def diff_se(self, a, b):
        """Standard error of mean[a] - mean[b] (same samples: paired)."""
        i, j = self.names.index(a), self.names.index(b)
        v = self.cov[i, i] + self.cov[j, j] - 2 * self.cov[i, j]
        return math.sqrt(max(v, 0.0) / self.n)


def sample_errors(model, S, s_sq, U):
    """Per-sample errors (c,) of a model on samples ``S`` (c, rank) in the coordinates of
    ``U`` (x = s U^T, ``s_sq = ||s||^2``): ``(W, E)`` a VQ model (``z = s (W U)^T``), or a
    codebook C (K, rank) in those coordinates; ``(W, E, V)`` with an untied decoder V;
    ``(W, E, V, assign)`` with a quantizer's own assignment rule (see :func:`own_codes`)."""
    if isinstance(model, tuple):
        W, E, V = (None if a is None else np.asarray(a, dtype=np.float64) for a in (*model, None, None)[:3])
        assign = model[3] if len(model) > 3 else None
        Y = None if V is None else latents(S, V @ U)        # (c, m) x V^T
        Z = latents(S, W @ U)
        return reconstruction_errors(s_sq, Z, E, W, None if assign is None else own_codes(assign, Z, E), V=V, Y=Y)[0]
    return nearest(S, np.asarray(model, dtype=np.float64))[1]


def population_errors(models, U, draw, n_pop, chunk=1 << 16, progress=quiet):
    """Reconstruction error of each model on ``n_pop`` samples, ``draw(a, c)`` giving
    samples a..a+c (see :meth:`Problem.samples`; for Gaussian data fresh samples of
    N(0, U diag(lam) U^T)).

    Works in the rank-``rank`` coordinates ``s`` (x = s U^T), chunk by chunk, so neither
    time nor memory grows with D: for a VQ model ``z = s (W U)^T`` and ``||x||^2 = ||s||^2``.
    Every model sees the same samples, so differences between models are paired.
    ``models``: name -> a model of :func:`sample_errors`; ``U`` (D, rank).
    """
    names = list(models)
    total, cross = np.zeros(len(names)), np.zeros((len(names), len(names)))
    for a in range(0, n_pop, chunk):
        progress("population error", a, n_pop)
        S = draw(a, min(chunk, n_pop - a))                  # (c, rank)
        s_sq = np.einsum("cr,cr->c", S, S)
        errs = np.stack([sample_errors(models[name], S, s_sq, U) for name in names], axis=1)  # (c, models)
        total += errs.sum(axis=0)
        cross += errs.T @ errs
    mean = total / n_pop
    cov = (cross - n_pop * np.outer(mean, mean)) / max(n_pop - 1, 1)
    return Population(names, mean, np.sqrt(np.maximum(np.diag(cov), 0) / n_pop), cov, n_pop)


# ---------------- The problem: data, true spectrum and the shared start point

@dataclasses.dataclass
class Problem:
    """What every method sees: the settings, the data, the true distribution's basis and
    spectrum, and the shared start point. Built by :func:`make_problem`; every method of
    a comparison reads the same one, so their differences are the methods' alone.

    Attributes
    ----------
    cfg : Config
        the settings.
    X_train : ndarray (n_train, D)
        the training samples (the batches are drawn from them, and PCA and k-means fit
        them), in ``cfg.dtype``.
    X_eval : ndarray (n_eval, D)
        held-out samples: the eval metrics, tuning's validation with ``--data``.
    U : ndarray (D, rank)
        orthonormal eigenbasis of the true second moment (synthetic data: the
        covariance's; ``--data``: the test rows' own, D x D); populations are drawn and
        scored in its coordinates ``s = x U``.
    lam : ndarray (rank,)
        its eigenvalues, descending: the floors and bounds are functions of them.
    W_pca : ndarray (m, D)
        the PCA encoder (top-m eigenvectors of the training second moment).
    E_kmeans : ndarray (K, m)
        k-means on the PCA latents: with ``W_pca``, pca_lloyd's model (the baseline).
    start_seconds : float
        seconds spent building (W_pca, E_kmeans).
    reference : tuple or callable
        (C (K, rank), seconds): k-means in data space (see :meth:`unconstrained`); a
        function that waits for it while its restarts run.
    W0, E0 : ndarray (m, D), (K, m)
        the start of every trained method (``--start``, see :func:`start_regime`).
    V0 : ndarray (m, D) or None
        the untied decoder's start (W0); None for the tied decoder.
    eval_sq : ndarray (n_eval,)
        ``||x||^2`` of the eval samples.
    progress : callable
        ``progress(phase, done, total)`` for long phases (see :class:`Progress`).
    curve : tuple or None
        (S, ||s||^2, the start's errors) of :func:`curve_point`'s fixed sample, once drawn.
    data : DataFile or None
        ``--data``: the mapped rows and their split; None for synthetic data.
    """
    cfg: Config
    X_train: np.ndarray
    X_eval: np.ndarray
    U: np.ndarray
    lam: np.ndarray
    W_pca: np.ndarray
    E_kmeans: np.ndarray
    start_seconds: float
    reference: object
    W0: np.ndarray = None
    E0: np.ndarray = None
    V0: np.ndarray = None
    eval_sq: np.ndarray = None
    progress: Callable = quiet
    curve: tuple = None
    data: DataFile = None

    def samples(self, rng, n, stream="population"):
        """(draw, n): ``draw(a, c)`` gives samples a..a+c (c, r) in U's coordinates of
        ``n`` samples of the true distribution, from ``rng`` (synthetic data); with
        ``--data``, the test rows (``"validation"``: the eval rows, which tuning may
        use), as many as there are, at most ``n``: fewer than all, drawn from ``rng``
        (rows in a file may be in any order)."""
        if self.data is None:
            return (lambda a, c: family_draw(self.cfg.family, rng, c, self.lam, self.cfg.m)), n
        if stream == "validation":
            return (lambda a, c: self.X_eval[a:a + c].astype(np.float64) @ self.U), min(n, len(self.X_eval))
        test = self.data.test
        if n < len(test):              # a part of them (the curves' sample): drawn, not the file's first
            test = np.sort(rng.choice(test, size=n, replace=False))
        return (lambda a, c: gather(self.data.rows, test[a:a + c], np.float64) @ self.U), min(n, len(test))

    def __post_init__(self):
        if self.W0 is None:
            self.W0, self.E0 = start_regime(self.cfg, self.X_train, self.W_pca, self.E_kmeans)
        if self.V0 is None and self.cfg.decoder == "untied":
            self.V0 = self.W0.copy()
        if self.eval_sq is None:
            self.eval_sq = np.einsum("nd,nd->n", self.X_eval, self.X_eval, dtype=np.float64)

    def unconstrained(self):
        """(C (K, rank), seconds): k-means in data space (see :func:`start_point`), waited
        for on first use: its restarts may run on while the methods train."""
        if callable(self.reference):
            self.reference = self.reference()
        return self.reference

    def start(self):
        """What :func:`start_point` computed: to build another problem on the same data."""
        return self.W_pca, self.E_kmeans, self.start_seconds, self.unconstrained()


def start_regime(cfg, X_train, W_pca, E_kmeans):
    """The start (W0, E0) of every trained method, by ``cfg.start``:

    * ``kmeans``: the PCA encoder and the converged k-means codebook (pca_lloyd's model);
    * ``random_codes``: the PCA encoder; codes ``e_j ~ N(0, diag(s^2))``, ``s`` the
      standard deviations of the training latents, per coordinate;
    * ``shifted``: the same with mean ``shift * s`` (every coordinate offset by ``shift``
      of its standard deviations; for isotropic latents the shifted-Gaussian simulation
      of Fang et al. 2025);
    * ``random``: a random orthonormal encoder (polar factor of a Gaussian matrix) and
      codes as ``random_codes`` at its latents' scale.
    Drawn from the ``"start"`` stream: the same for every method, whatever else runs.
    """
    if cfg.start == "kmeans":
        return W_pca, E_kmeans
    rng = derived_rng(cfg.seed, "start")
    m, D = W_pca.shape
    W = W_pca
    if cfg.start == "random":
        W = stiefel_project(rng.standard_normal((m, D))).astype(W_pca.dtype)
    s = latents(X_train, W).std(axis=0)                     # (m,) the latents' scale
    E = rng.standard_normal((cfg.K, m)) * s
    if cfg.start == "shifted":
        E += cfg.shift * s
    return W, E.astype(W_pca.dtype)


DIVERGED = 1e4   # a run whose eval error grows past this multiple of its start has diverged


def eval_metrics(problem, W, E, V=None, assign=None):
    """:func:`metrics` of (W, E, V) on the eval set, with the angle to the true eigenspace."""
    m = problem.cfg.m
    row = metrics(W, E, problem.X_eval, problem.eval_sq, V, assign)
    row["subspace_angle_deg"] = subspace_angle_deg(W, problem.U[:, :m]) if m <= problem.cfg.rank else None
    return row


N_CURVE = 20_000    # fresh samples on which the training curves are scored (paired)


def curve_point(problem, W, E, V=None, assign=None):
    """What the report scores, along training: the paired difference of the model's error
    to the start's on a fixed sample of ``min(N_CURVE, n_pop)`` fresh samples (its own
    stream; with ``--data``, test rows drawn on it), with its standard error, and the
    model's own mean error there (``curve_recon_mse``: the population error, estimated
    on that sample, in the same units as every other error); empty with ``n_pop=0``."""
    n = min(N_CURVE, problem.cfg.n_pop)
    if n == 0:
        return {}
    if problem.curve is None:
        draw, n = problem.samples(derived_rng(problem.cfg.seed, "curves"), n, "curves")
        S = draw(0, n)
        s_sq = np.einsum("nr,nr->n", S, S)
        problem.curve = (S, s_sq, sample_errors((problem.W0, problem.E0), S, s_sq, problem.U))
    S, s_sq, start = problem.curve
    errors = sample_errors((W, E, V, assign), S, s_sq, problem.U)
    d = errors - start
    return {"pop_diff_to_start": float(d.mean()), "pop_diff_to_start_se": float(d.std(ddof=1) / math.sqrt(len(d))),
            "curve_recon_mse": float(errors.mean())}


def fresh_metrics(problem, rng, W, E, V=None, assign=None):
    """What a quantizer study reports along training (``--eval_every``), on
    ``eval_samples`` fresh samples of the true distribution drawn from ``rng``:
    ``quant_error`` mean ||z - q||^2 (the quantizer's own error; with m = D = rank it is
    the reconstruction error), ``recon_mse``, ``codes_used`` (the share of codes that
    some sample picks), ``perplexity``, and the 2-Wasserstein distance between Gaussian
    fits of the latents and the codes, exact (``w2``) and as Fang et al.'s simulation
    computes it (``w2_eigh``, :func:`wasserstein_eigh`)."""
    c = problem.cfg
    S = family_draw(c.family, rng, c.eval_samples, problem.lam, c.m)   # (n, rank)
    s_sq = np.einsum("nr,nr->n", S, S)
    Z = latents(S, W @ problem.U)                           # (n, m)
    Y = None if V is None else latents(S, V @ problem.U)
    err, labels, dist = reconstruction_errors(s_sq, Z, E, W, None if assign is None else own_codes(assign, Z, E),
                                              V=V, Y=Y)
    counts = np.bincount(labels, minlength=E.shape[0])
    Z64, E64 = Z.astype(np.float64), E.astype(np.float64)
    return {"quant_error": float(dist.mean()), "recon_mse": float(err.mean()),
            "codes_used": float(np.mean(counts > 0)), "perplexity": usage_stats(labels, E.shape[0])["perplexity"],
            "w2": float(wasserstein_distance(Z64, E64)), "w2_eigh": float(wasserstein_eigh(Z64, E64))}


START_REGIMES = ("kmeans", "random_codes", "shifted", "random")
LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(cfg, t):
    """The learning-rate multiplier of step t = 1..steps (``cfg.lr_schedule``):
    constant 1, or a decay from 1 towards 0: ``cos`` half-wave or linear."""
    done = (t - 1) / max(cfg.steps, 1)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    return 1 - done if cfg.lr_schedule == "linear" else 1.0


# ------ The optimizer: how a parameter steps, apart from what its gradient is

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


class Optimizer:
    """Steps every trained parameter by its gradient, each at its own base rate times the
    schedule's factor, with one rule (``kind``, :data:`OPTIMIZERS`), as PyTorch defines it:

    - ``sgd``: ``p <- p - lr g``;
    - ``momentum`` (``torch.optim.SGD`` with momentum, no dampening): ``b <- mu b + g``,
      ``p <- p - lr b``;
    - ``adam`` / ``adamw`` (``torch.optim.Adam`` / ``AdamW``): ``m <- b1 m + (1-b1) g``,
      ``v <- b2 v + (1-b2) g^2``, ``p <- p - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``;
    - ``weight_decay``: added to the gradient as ``wd p`` (sgd, momentum, adam) or
      decoupled, ``p <- p (1 - lr wd)`` before the step (adamw).

    ``W`` takes the Riemannian version of the same rule on the Stiefel manifold (as
    geoopt's ``RiemannianSGD`` and ``RiemannianAdam``): the gradient projected onto the
    tangent space (:func:`tangent`), the direction projected again where Adam's
    elementwise scaling leaves it, the step retracted by the polar factor, and the
    momentum (or first moment) carried to the new point by projection onto its tangent
    space; the second moment, elementwise, stays. Weight decay does not reach W: ``W``'s
    own direction is normal to the manifold. ``state`` holds each parameter's buffers.
    """

    def __init__(self, rates, kind="sgd", momentum=0.9, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8):
        self.rates = dict(rates)    # name -> base learning rate
        self.kind, self.mu, self.betas, self.wd, self.eps = kind, momentum, tuple(betas), weight_decay, eps
        self.state = {}             # name -> that parameter's optimizer state

    def step(self, name, p, g, factor=1.0):
        lr, on_W, s = factor * self.rates[name], name == "W", self.state.setdefault(name, {"t": 0})
        if on_W:
            g = tangent(p, g)
        elif self.wd and self.kind != "adamw":
            g = g + self.wd * p
        if self.kind == "momentum":
            s["buf"] = d = self.mu * s.get("buf", 0.0) + g
        elif self.kind in ("adam", "adamw"):
            (b1, b2), s["t"] = self.betas, s["t"] + 1
            s["buf"] = b1 * s.get("buf", 0.0) + (1 - b1) * g
            s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
            d = (s["buf"] / (1 - b1 ** s["t"])) / (np.sqrt(s["v"] / (1 - b2 ** s["t"])) + self.eps)
            d = tangent(p, d) if on_W else d
        else:
            d = g
        if on_W:
            new = stiefel_project(p - lr * d)               # polar retraction
            if "buf" in s:
                s["buf"] = tangent(new, s["buf"])           # carried to the new tangent space
            return new
        if self.wd and self.kind == "adamw":
            p = p * (1 - lr * self.wd)
        return p - lr * d


# ---- Methods: what each declares (parameters, loss, gradients), and the registry

@dataclasses.dataclass
class Result:
    """What one method produced: its model and how its run went (set by training or
    fitting), and its scores (eval metrics by :func:`score`, the population error by
    :func:`population_scores`)."""
    W: np.ndarray = None          # (m, D) encoder
    E: np.ndarray = None          # (K, m) codebook
    V: np.ndarray = None          # (m, D) untied decoder, None for the tied one
    assign: Callable = None       # its own cells (Z -> labels), None for the nearest code
    params: dict = None           # its own parameters at the end
    status: str = "ok"            # ok, diverged or skipped
    diverged_at_step: int = None
    note: str = ""
    logs: dict = None             # eval rows, batch losses, re-seeded codes
    seconds: float = 0.0
    scores: dict = dataclasses.field(default_factory=dict)   # metrics and population error

    @property
    def ok(self):
        return self.status == "ok"

    def as_dict(self):
        """The entry of ``summary["results"]``: the model, the run and every score."""
        return {"W": self.W, "E": self.E, "V": self.V, "assign": self.assign, "logs": self.logs,
                "status": self.status, "diverged_at_step": self.diverged_at_step, "note": self.note,
                "seconds": self.seconds, **self.scores}


class Step(NamedTuple):
    """What a gradient method returns for one batch."""
    loss: float          # the (surrogate) loss at the point
    gW: np.ndarray       # (m, D) Euclidean gradient of the encoder
    gV: np.ndarray       # (m, D) the untied decoder's, or None
    grads: dict          # name -> gradient of each parameter of the method's own it trains


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: what it is and what it declares; :func:`train` trains it.

    A gradient method declares its parameters (``init``), the codebook they give, what
    its surrogate holds fixed on a batch (``freeze``), that surrogate from its definition
    (``loss``: the checker differentiates it) and its hand-derived gradients
    (``loss_and_grads``); optionally a non-gradient step (``update``, EMA's), its own
    cells (``assign``), its re-seeding (``reset``) and a step of its own after the
    optimizer's on the batch's latents (``anchor``). A fitted method declares ``fit``.
    Every callable takes ``hp``, the settings it reads (:func:`hyperparameters`).
    """
    label: str
    paper: str = ""
    init: Callable = None            # (problem, hp) -> {name: ndarray}: its own parameters at the start
    codebook: Callable = None        # (params, hp) -> E (K, m) (a stack (P, K, m) from stacked params)
    freeze: Callable = None          # (W, V, params, Xb, hp, rng) -> what the surrogate holds fixed
    loss: Callable = None            # (W, V, params, Xb, frozen, hp) -> surrogate; one argument may be a stack: (P,)
    loss_and_grads: Callable = None  # (W, V, params, Xb, frozen, hp) -> Step
    update: Callable = None          # (params, frozen, hp) -> (params, frozen), before the gradient step
    assign: Callable = None          # (params, hp) -> labels(Z): its own cells instead of the nearest code
    reset: Callable = None           # (params, codes, latents, hp) -> params: re-seed dead codes
    anchor: Callable = None          # (params, latents, hp) -> params: a step of its own after the optimizer's
    shared: tuple = ()               # parameters shared by the K codes: they step at lrE / K
    fit: Callable = None             # (problem, hp) -> Result: a fitted (non-gradient) method
    skip: Callable = None            # (problem, hp) -> why it cannot run here, or None
    note: Callable = None            # (problem, hp) -> a word on its run for the report
    estimator: str = None            # its gradient estimator, for the reports
    hand_derived: bool = True        # False: its gradients are the finite differences themselves
    stochastic: bool = False         # draws noise while training (its own stream)
    in_default: bool = True          # run when no --methods are named
    hyperparameters: tuple = ()      # (name, the authors' default, help[, (lo, hi) the authors' range: tunable])
    recipe: Callable = None          # (cfg) -> its authors' settings, for --recipe authors (see RECIPE_KEYS)


# What a recipe or a variant may set for one method: Config fields, besides the method's
# own hyperparameters.
RECIPE_KEYS = ("alpha", "beta", "lrE", "lrW", "lrV", "optimizer", "momentum", "betas", "weight_decay",
               "dead_threshold", "replace_every", "replace_below", "ema_decay", "ema_eps", "fsq_levels")


def parse_spec(spec):
    """A method as run: its registry key and settings of its own, ``"key"`` or
    ``"key[name=value, ...]"`` (a variant: an ablation, or a tuned rate).

    >>> parse_spec("affine_ste[nu=0, optimizer=adam]")
    ('affine_ste', {'nu': 0.0, 'optimizer': 'adam'})
    """
    name, _, rest = spec.partition("[")
    settings = {}
    for item in filter(None, (i.strip() for i in rest.rstrip("]").split(","))):
        key, _, value = item.partition("=")
        try:
            settings[key.strip()] = float(value)
        except ValueError:
            settings[key.strip()] = value.strip()
    return name.strip(), settings


def split_methods(items):
    """Method specs from command-line words, each of which may list several split by
    commas outside the brackets: ``["manual_ste,affine_ste[nu=0, a=0]"]`` -> two specs."""
    return [m.strip() for item in items for m in re.split(r",(?![^\[]*\])", item) if m.strip()]


def spec_of(name, **settings):
    """The inverse of :func:`parse_spec`: ``spec_of("manual_ste", lrE=0.4)``."""
    return name + ("[" + ", ".join(f"{k}={v:.12g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in settings.items()) + "]" if settings else "")


def method_config(cfg, spec):
    """The method a spec names and the :class:`Config` it runs with: ``cfg``, then its
    authors' recipe under ``--recipe authors``, then the spec's own settings."""
    name, own = parse_spec(spec)
    method = METHODS[name]
    settings = {**(method.recipe(cfg) if cfg.recipe == "authors" and method.recipe else {}), **own}
    mine = {n for n, *_ in method.hyperparameters}
    params = {f"{name}_{k}": settings.pop(k) for k in list(settings) if k in mine}
    return method, dataclasses.replace(cfg, **settings, method_params={**cfg.method_params, **params})


def hyperparameters(cfg, name):
    """What the method ``name`` reads (``hp``) in a method's config (:func:`method_config`):
    the shared loss weights and sizes, and its own hyperparameters by their short names
    (``hp.nu`` for ``--affine_ste_nu``)."""
    name = parse_spec(name)[0]
    own = {n: cfg.method_params[f"{name}_{n}"] for n, *_ in METHODS[name].hyperparameters}
    shared = ("alpha", "beta", "K", "m", "D", "steps", "fd_h", "ema_decay", "ema_eps", "dead_threshold",
              "fsq_levels")
    return types.SimpleNamespace(**{k: getattr(cfg, k) for k in shared}, **own)


def per_element(cfg, alpha, beta, **rest):
    """An authors' recipe with losses averaged per element (PyTorch's ``F.mse_loss``):
    ``mean_d (x - x^)^2 + alpha mean_k (sg(z) - e)^2 + ...`` is ``1/D`` times our sums
    with the VQ weights times ``D/m``; the factor ``1/D`` is absorbed by the tuned rate
    (and ignored by Adam)."""
    return {"alpha": alpha * cfg.D / cfg.m, "beta": beta * cfg.D / cfg.m, **rest}


def vq_method(label, paper="", estimator="ste", weights=lambda hp: (hp.alpha, hp.beta),
              init=lambda problem, hp: {"E": problem.E0.copy()}, codebook=lambda params, hp: params["E"],
              codebook_grads=lambda params, gE, hp: {"E": gE}, **fields):
    """A method that quantizes to a codebook and trains with a gradient estimator (see
    :class:`Frozen`): the loss ``recon + alpha codebook + beta commitment`` with
    ``(alpha, beta) = weights(hp)``, the codebook ``codebook(params, hp)`` of its
    parameters (by default the shared start codebook ``E`` itself), whose gradients follow
    from the codebook's by ``codebook_grads(params, gE, hp)`` (the chain rule). ``hp.nu``
    (synchronized commitment) and ``hp.noise`` (DiVeQ) are read where the method has them.
    Other ``fields`` go to :class:`Method`."""
    def freeze_(W, V, params, Xb, hp, rng):
        E = codebook(params, hp).astype(W.dtype, copy=False)
        return freeze(W, E, Xb, estimator, rng, getattr(hp, "noise", 1e-3), getattr(hp, "nu", 0.0))

    def loss_(W, V, params, Xb, frozen, hp):
        return surrogate_loss(W, codebook(params, hp), Xb, frozen, *weights(hp), V)

    def loss_and_grads_(W, V, params, Xb, frozen, hp):
        E = codebook(params, hp).astype(W.dtype, copy=False)
        gr = manual_grads(W, E, Xb, *weights(hp), frozen=frozen, V=V)
        return Step(gr.loss, gr.gW, gr.gV, codebook_grads(params, gr.gE, hp))
    return Method(label, paper, init=init, codebook=codebook, freeze=freeze_, loss=loss_,
                  loss_and_grads=loss_and_grads_, estimator=estimator, **fields)


def reset_codes(params, codes, values, hp):
    """Dead-code re-seeding of a plain codebook: the codes take the latents."""
    E = params["E"].copy()
    E[codes] = values
    return {**params, "E": E}


def fd_ste_loss_and_grads(W, V, params, Xb, frozen, hp):
    """STE's gradients by :func:`fd_grads` (central differences of the frozen surrogate)."""
    gr = fd_grads(W, params["E"], Xb, hp.alpha, hp.beta, "ste", hp.fd_h, frozen=frozen, V=V)
    return Step(gr.loss, gr.gW, gr.gV, {"E": gr.gE})


def fd_ste_budget(problem, hp):
    """Why fd_ste is skipped: its loss evaluations exceed ``--fd_max_evals``."""
    c = problem.cfg
    n = problem.W0.size + problem.E0.size + (0 if problem.V0 is None else problem.V0.size)
    if c.steps * 2 * n > c.fd_max_evals and not c.force_fd:
        return (f"{c.steps * 2 * n:.3g} loss evaluations (steps x 2 x {n} parameters) exceed "
                f"--fd_max_evals {c.fd_max_evals:g}; --force_fd runs it")
    return None


def ema_init(problem, hp):
    """The codebook and its moving averages (hidden, before debiasing), and the updates
    made; without ``debias`` the sums start at the codes themselves, about their centre
    (``origin``, see :func:`ema_update`)."""
    K, m = problem.E0.shape
    if getattr(hp, "debias", 1.0):
        return {"E": problem.E0.copy(), "counts": np.zeros(K), "sums": np.zeros((K, m)), "t": np.zeros(())}
    origin = problem.E0.astype(np.float64).mean(axis=0)
    return {"E": problem.E0.copy(), "counts": np.zeros(K), "sums": problem.E0 - origin, "t": np.zeros(()),
            "origin": origin}


def ema_update(params, frozen, hp):
    """One EMA codebook update (van den Oord et al. 2017, app. A.1), debiased and
    Laplace-smoothed as DeepMind Sonnet's ``VectorQuantizerEMA``, from the batch's
    clusters at the point before the step:
    ``N_j <- decay N_j + (1-decay) n_j``, ``M_j <- decay M_j + (1-decay) sum_{i in j} z_i``,
    both divided by ``1 - decay^t``; the counts are Laplace-smoothed,
    ``N_j' = (N_j + eps) / (sum N + K eps) * sum N``, and ``e_j = M_j / N_j'``. While
    every code is used this is Sonnet's update; a code never used keeps its vector
    (Sonnet's becomes exactly 0).

    With ``debias=0``, the quantizer of Fang et al.'s simulation (VQ-Research/Wasserstein-VQ
    ``SimulationAnalyses/.../GaussianDistribution/VariousVQs.py``, ``ema_update``): the
    counts start at zero, the sums at the initial codes, nothing is debiased, and every
    code is set to its sum over its smoothed count, used or not: a code unused from the
    start is divided by about ``eps`` and leaves the data for good, then decays toward
    the origin of the coordinates. That origin is where their codes are drawn (their data
    are shifted, ours centred with the codes shifted): the averages are kept about the
    start codes' centre, ``origin``, so that the same happens here.
    """
    E, decay, debiased = params["E"], hp.ema_decay, getattr(hp, "debias", 1.0)
    n_j, s_j = cluster_sums(frozen.Z0, frozen.labels, E.shape[0])
    origin = params.get("origin", 0.0)
    if not debiased:
        s_j = s_j - n_j[:, None] * origin
    counts = decay * params["counts"] + (1 - decay) * n_j
    sums = decay * params["sums"] + (1 - decay) * s_j
    t = params["t"] + 1
    debias = 1 - decay ** t if debiased else 1.0
    N, M = counts / debias, sums / debias
    smoothed = (N + hp.ema_eps) / (N.sum() + E.shape[0] * hp.ema_eps) * N.sum()
    E_new, used = np.array(E, dtype=np.float64), N > 0 if debiased else np.ones(len(N), bool)
    E_new[used] = origin + M[used] / smoothed[used, None]
    return {**params, "E": E_new.astype(E.dtype, copy=False), "counts": counts, "sums": sums, "t": t}, frozen


def ema_reset(params, codes, values, hp):
    """A re-seeded code restarts its averages at the latent it took, with the count the
    threshold (debiased: count T, sum T * latent)."""
    params = {k: v.copy() for k, v in params.items()}
    debias = 1 - hp.ema_decay ** params["t"] if getattr(hp, "debias", 1.0) else 1.0
    params["E"][codes] = values
    params["counts"][codes] = hp.dead_threshold * debias
    params["sums"][codes] = hp.dead_threshold * (values - params.get("origin", 0.0)) * debias
    return params


def online_anchor(params, Z, hp):
    """Online clustering's step after the gradient step (Zheng and Vedaldi, ICCV 2023,
    CVQ-VAE; as Fang et al.'s simulation runs it, VQ-Research/Wasserstein-VQ
    ``VariousVQs.py``, ``online_update``): each code's running usage ``p_j <- d p_j +
    (1-d) n_j / B`` (from zero), then the code pulled toward its nearest latent of the
    batch ``a_j``: ``e_j <- (1 - w_j) e_j + w_j a_j``, ``w_j = exp(-10 K p_j / (1-d) -
    1e-3)``: a code in use stays, an unused one jumps to the data. ``Z`` (B, m) the batch's
    latents; the nearest codes and latents are those of the codes after the gradient step."""
    E = params["E"]
    K = E.shape[0]
    n_j = np.bincount(nearest(Z, E)[0], minlength=K)
    prob = hp.decay * params["prob"] + (1 - hp.decay) * n_j / len(Z)
    anchors = Z[nearest(E, Z)[0]]                           # (K, m) each code's nearest latent
    w = np.exp(-10 * K * prob / (1 - hp.decay) - 1e-3)[:, None]
    return {**params, "E": (E * (1 - w) + anchors * w).astype(E.dtype, copy=False), "prob": prob}


def affine_codebook(params, hp):
    """Huh et al.'s affine reparameterisation: ``E = (1 + a s) * C + a t`` (K, m), s and t
    of shape (m,) shared by every code (vqtorch ``nn/affine.py``, ``AffineTransform``);
    stacks of C (P, K, m) or of s, t (P, m) give stacks of codebooks."""
    C, s, t, a = params["C"], params["s"], params["t"], hp.a
    return (1 + a * s[..., None, :]) * C + a * t[..., None, :]


def affine_grads(params, gE, hp):
    """The gradients of C, s and t from the codebook's ``G``: ``G * (1 + a s)``,
    ``a sum_j G_j * C_j``, ``a sum_j G_j``."""
    return {"C": gE * (1 + hp.a * params["s"]), "s": hp.a * np.sum(gE * params["C"], axis=0),
            "t": hp.a * np.sum(gE, axis=0)}


def affine_update(params, frozen, hp):
    """With ``alternate``: the codes' own step first (vqtorch ``inplace_optimizer``), C alone
    down ``mean_{i,d} (e_k - sg(z_i))^2`` by SGD at ``inner_lr`` with heavy-ball momentum
    ``inner_momentum`` (a damped Lloyd step), the assignments kept; the task step then sees
    the moved codes (and, as the authors', no commitment term: see the registry's weights)."""
    if not hp.alternate:
        return params, frozen
    K, m = params["C"].shape
    E = affine_codebook(params, hp).astype(frozen.Z0.dtype)
    counts, sums = cluster_sums(frozen.Z0, frozen.labels, K)
    g_inner = (2.0 / (frozen.Z0.shape[0] * m)) * (counts[:, None] * E - sums) * (1 + hp.a * params["s"])
    buf = hp.inner_momentum * params.get("C_buf", 0.0) + g_inner
    params = {**params, "C": params["C"] - hp.inner_lr * buf, "C_buf": buf}
    E = affine_codebook(params, hp).astype(frozen.Z0.dtype)
    return params, frozen._replace(Q0=E[frozen.labels], C=E[frozen.labels] - frozen.Z0)


def affine_reset(params, codes, values, hp):
    """A re-seeded code sets its row of C so that its effective code is the latent."""
    C = params["C"].copy()
    C[codes] = (values - hp.a * params["t"]) / (1 + hp.a * params["s"])
    return {**params, "C": C}


def simvq_codebook(params, hp):
    """SimVQ's ``E = C P^T + 1 b^T``; stacks of P (n, m, m) or b (n, m) give stacks."""
    return params["C"] @ np.swapaxes(params["P"], -1, -2) + params["b"][..., None, :]


def simvq_init(problem, hp):
    """SimVQ's parameters at the start: the frozen basis C (K, m), the map P (m, m) and the
    bias b (m,). ``linear_init=0``: C the shared start codebook, P = I, b = 0 (the start
    codebook itself). ``linear_init=1``: the linear quantizer of Fang et al.'s simulation
    (VQ-Research/Wasserstein-VQ ``VariousVQs.py``, ``codebook_projection``, an
    ``nn.Linear`` with PyTorch's default init): P and b uniform in ``+-1/sqrt(m)`` (the
    ``"init"`` stream), the basis the start codes about their mean, which b carries (their
    basis is N(0, I) and their data are shifted; ours are centred and the codes shifted:
    the same geometry, since the map acts on the basis about its own centre)."""
    C = problem.E0.astype(np.float64)
    if not hp.linear_init:
        return {"C": C, "P": np.eye(hp.m), "b": np.zeros(hp.m)}
    rng, bound = derived_rng(problem.cfg.seed, "init"), 1 / math.sqrt(hp.m)
    centre = C.mean(axis=0)
    P = rng.uniform(-bound, bound, (hp.m, hp.m))
    return {"C": C - centre, "P": P, "b": centre + rng.uniform(-bound, bound, hp.m)}


def simvq_reset(params, codes, values, hp):
    """A re-seeded code sets its row of the frozen basis: ``C_j P^T + b`` = the latent."""
    C = params["C"].copy()
    C[codes] = np.linalg.lstsq(params["P"], (values - params["b"]).T, rcond=None)[0].T
    return {**params, "C": C}


def _sym_power(S, power, floor=1e-12):
    """``S^power`` of a symmetric positive semi-definite matrix (or a stack), its
    eigenvalues clamped at ``floor`` (as the authors clamp theirs): exact and symmetric."""
    vals, vecs = np.linalg.eigh((S + np.swapaxes(S, -1, -2)) / 2)
    return (vecs * np.maximum(vals, floor)[..., None, :] ** power) @ np.swapaxes(vecs, -1, -2)


def gaussian_fit(X):
    """Mean (…, m), centred rows (…, n, m) and covariance (…, m, m) (divided by n) of the
    rows of ``X`` (…, n, m); the covariance of a single set by :func:`t_dot`'s blocks."""
    mu = X.mean(axis=-2)
    Xc = X - mu[..., None, :]
    S = t_dot(Xc, Xc) if X.ndim == 2 else np.swapaxes(Xc, -1, -2) @ Xc
    return mu, Xc, S / X.shape[-2]


def wasserstein_distance(Z, E):
    """The 2-Wasserstein distance between Gaussian fits of the latents ``Z`` (…, n, m) and
    the codes ``E`` (…, K, m) (Fang et al. 2025, ``calc_wasserstein_distance`` in
    VQ-Research/Wasserstein-VQ ``VariousVQs.py``), from its definition:
    ``sqrt(||mu_z - mu_c||^2 + relu(tr(S_z + S_c - 2 (A S_c A)^(1/2))) + 1e-8)``,
    ``A = S_z^(1/2)``, covariances divided by n and K. The authors take the square root
    of the non-symmetric ``S_z S_c`` with ``eigh`` (which reads one triangle only); this
    is the exact symmetric form. Stacks give one distance each."""
    (mu_z, _, S_z), (mu_c, _, S_c) = gaussian_fit(Z), gaussian_fit(E)
    A = _sym_power(S_z, 0.5)
    trace = (np.trace(S_z, axis1=-2, axis2=-1) + np.trace(S_c, axis1=-2, axis2=-1)
             - 2 * np.trace(_sym_power(A @ S_c @ A, 0.5), axis1=-2, axis2=-1))
    return np.sqrt(np.sum((mu_z - mu_c) ** 2, axis=-1) + np.maximum(trace, 0.0) + 1e-8)


def wasserstein_grads(Z, E):
    """:func:`wasserstein_distance` of ``Z`` (n, m) and ``E`` (K, m) and its gradients
    (n, m), (K, m), from the closed form::

        dWd/dS_c = (I - A M^(-1/2) A) / (2 Wd),  M = A S_c A;   dWd/dS_z likewise, B = S_c^(1/2)
        dWd/de_j = (2/K) (e_j - mu_c) dWd/dS_c - (mu_z - mu_c) / (K Wd)
        dWd/dz_i = (2/n) (z_i - mu_z) dWd/dS_z + (mu_z - mu_c) / (n Wd)
    """
    n, K = Z.shape[0], E.shape[0]
    (mu_z, Zc, S_z), (mu_c, Ec, S_c) = gaussian_fit(Z), gaussian_fit(E)   # (m, m) covariances
    A, B = _sym_power(S_z, 0.5), _sym_power(S_c, 0.5)
    M = A @ S_c @ A
    trace = np.trace(S_z) + np.trace(S_c) - 2 * np.trace(_sym_power(M, 0.5))
    Wd = float(wasserstein_distance(Z, E))
    none = np.zeros_like(S_z)
    G_c = (np.eye(len(mu_z)) - A @ _sym_power(M, -0.5) @ A) / (2 * Wd) if trace > 0 else none
    G_z = (np.eye(len(mu_z)) - B @ _sym_power(B @ S_z @ B, -0.5) @ B) / (2 * Wd) if trace > 0 else none
    gZ = (2 / n) * latents(Zc, np.transpose(G_z)) + (mu_z - mu_c) / (n * Wd)   # blocked products
    gE = (2 / K) * latents(Ec, np.transpose(G_c)) - (mu_z - mu_c) / (K * Wd)
    return Wd, gZ, gE


def _lower(M):
    """What ``eigh`` reads of ``M`` (…, m, m): the lower triangle, mirrored."""
    return np.tril(M) + np.swapaxes(np.tril(M, -1), -1, -2)


def wasserstein_eigh(Z, E):
    """Fang et al.'s simulation's distance (``calc_wasserstein_distance`` in VariousVQs.py,
    the one their Gaussian study trains with and reports): ``sqrt(||mu_z - mu_c||^2 +
    relu(tr(S_z + S_c) - 2 sum_i sqrt(relu(l_i) + 1e-8)) + 1e-8)``, ``l_i`` the eigenvalues
    that ``eigh`` returns for the non-symmetric ``S_z S_c``: those of its lower triangle
    mirrored. It equals :func:`wasserstein_distance` when ``S_z S_c`` is symmetric (the
    covariances commute) and approximates it otherwise. Stacks give one distance each."""
    (mu_z, _, S_z), (mu_c, _, S_c) = gaussian_fit(Z), gaussian_fit(E)
    lam = np.linalg.eigvalsh(_lower(S_z @ S_c))
    trace = (np.trace(S_z, axis1=-2, axis2=-1) + np.trace(S_c, axis1=-2, axis2=-1)
             - 2 * np.sum(np.sqrt(np.maximum(lam, 0) + 1e-8), axis=-1))
    return np.sqrt(np.sum((mu_z - mu_c) ** 2, axis=-1) + np.maximum(trace, 0.0) + 1e-8)


def wasserstein_eigh_grads(Z, E):
    """:func:`wasserstein_eigh` of ``Z`` (n, m) and ``E`` (K, m) and its gradients (n, m),
    (K, m). With ``M = S_z S_c``, ``Q diag(l) Q^T`` the mirrored lower triangle's
    eigendecomposition and ``G = Q diag(g) Q^T``, ``g_i = [l_i > 0] / (2 sqrt(l_i + 1e-8))``,
    the derivative of the trace's root part in M is ``2 tril(G) - diag(G)`` (the function
    reads the lower triangle only). PyTorch's ``eigh`` backward returns G itself (the
    derivative for symmetric changes of its input): the symmetric parts agree, the two
    differ by ``G``'s antisymmetric completion carried through ``S_z`` and ``S_c`` (zero
    when the covariances commute). This is the derivative of the function as computed."""
    n, K = Z.shape[0], E.shape[0]
    (mu_z, Zc, S_z), (mu_c, Ec, S_c) = gaussian_fit(Z), gaussian_fit(E)
    lam, Q = np.linalg.eigh(_lower(S_z @ S_c))
    trace = np.trace(S_z) + np.trace(S_c) - 2 * np.sum(np.sqrt(np.maximum(lam, 0) + 1e-8))
    Wd = float(wasserstein_eigh(Z, E))
    G = (Q * np.where(lam > 0, 0.5 / np.sqrt(np.maximum(lam, 0) + 1e-8), 0.0)) @ Q.T
    G_M = 2 * np.tril(G) - np.diag(np.diag(G))              # d(sum sqrt) / dM
    I = np.eye(len(mu_z))
    on = 1.0 if trace > 0 else 0.0
    H_c = on * (I - 2 * S_z.T @ G_M)                        # d trace / d S_c
    H_z = on * (I - 2 * G_M @ S_c.T)                        # d trace / d S_z
    gE = (latents(Ec, H_c + H_c.T) / K - 2 * (mu_z - mu_c) / K) / (2 * Wd)   # blocked products
    gZ = (latents(Zc, H_z + H_z.T) / n + 2 * (mu_z - mu_c) / n) / (2 * Wd)
    return Wd, gZ, gE


def wasserstein_loss(W, V, params, Xb, frozen, hp):
    Z = Xb @ np.swapaxes(W, -1, -2) if hp.encoder else frozen.Z0     # (…, B, m)
    distance = wasserstein_distance if hp.exact else wasserstein_eigh
    return (surrogate_loss(W, params["E"], Xb, frozen, hp.alpha, hp.beta, V)
            + hp.weight * distance(Z, params["E"]))


def wasserstein_loss_and_grads(W, V, params, Xb, frozen, hp):
    """STE plus ``weight`` times the distance, its gradient reaching the codes and, with
    ``encoder``, through the latents the encoder; without, the latents' statistics are
    held fixed, as the authors' VQ code does (VQ-Research/Wasserstein-VQ
    ``code/VQGAN/models/wasserstein_quantizer.py``, ``calc_wasserstein_loss``: z's mean
    and covariance detached)."""
    gr = manual_grads(W, params["E"], Xb, hp.alpha, hp.beta, frozen=frozen, V=V)
    Wd, gZ, gE = (wasserstein_grads if hp.exact else wasserstein_eigh_grads)(frozen.Z0, params["E"])
    gW = gr.gW + hp.weight * t_dot(gZ, Xb) if hp.encoder else gr.gW
    return Step(gr.loss + hp.weight * Wd, gW, gr.gV, {"E": gr.gE + hp.weight * gE})


# --- FSQ (Mentzer et al., ICLR 2024): no codebook, rounding per dimension

# FSQ levels of the authors' Table 1 (as reproduced in third-party code) for d dimensions.
FSQ_TABLE = {(2 ** 8, 3): (8, 6, 5), (2 ** 10, 4): (8, 5, 5, 5), (2 ** 12, 5): (7, 5, 5, 5, 5),
             (2 ** 14, 5): (8, 8, 8, 6, 5), (2 ** 16, 6): (8, 8, 8, 5, 5, 5)}


@functools.lru_cache(maxsize=None)
def lloyd_max(L, tol=1e-13):
    """The mean squared error of the best L-level scalar quantizer of N(0, 1) (Lloyd 1982,
    Max 1960): thresholds at the midpoints, levels at the conditional means, iterated
    until no level moves by ``tol``. Above 32 levels, where the iteration needs of the
    order of L^2 rounds, its high-resolution value ``sqrt(3) pi / (2 L^2)`` (Panter and
    Dite 1951; 3% above the exact value at L = 64, less beyond).

    >>> [round(lloyd_max(L), 4) for L in (1, 2, 3, 4)]          # Max 1960, Table I
    [1.0, 0.3634, 0.1902, 0.1175]
    """
    if L > 32:
        return math.sqrt(3) * math.pi / (2 * L * L)
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    c = [3.0 * (2 * i + 1 - L) / L for i in range(L)]           # a start spread over +-3
    while True:
        t = [-math.inf] + [(u + v) / 2 for u, v in zip(c, c[1:])] + [math.inf]
        p = [Phi(b) - Phi(a) for a, b in zip(t, t[1:])]
        c, old = [(phi(a) - phi(b)) / q for a, b, q in zip(t, t[1:], p)], c
        if max(abs(u - v) for u, v in zip(c, old)) < tol:
            return 1.0 - sum(q * v * v for q, v in zip(p, c))


def fsq_levels(K, m, variances=None):
    """Levels per latent dimension for FSQ with at most K codes, allotted by the latents'
    ``variances`` (m,): the levels (each >= 2, product <= K) that minimise the error of
    the best product quantizer, ``sum_d var_d lloyd_max(L_d)``, the largest levels to the
    largest variances (equal variances when not given). None if K < 2^m (a dimension
    would have one level).

    >>> fsq_levels(64, 4, [4, 3, 2, 1]), fsq_levels(32, 2)
    ([4, 4, 2, 2], [6, 5])
    """
    if K < 2 ** m:
        return None
    var = np.ones(m) if variances is None else np.asarray(variances, dtype=float)

    def best(d, room, top):             # levels <= top for the d-th largest variance on
        if d == m:
            return 0.0, ()
        options = []
        for L in range(2, min(top, int(room // 2 ** (m - d - 1))) + 1):
            err, rest = best(d + 1, room // L, L)
            options.append((ranked[d] * lloyd_max(L) + err, (L,) + rest))
        return min(options)
    order = np.argsort(-var, kind="stable")
    ranked = var[order]
    levels = best(0, K, K)[1]
    return [int(levels[list(order).index(d)]) for d in range(m)]


def fsq_bound(T, levels, symmetric=True, eps=1e-3):
    """FSQ's bounding of ``T`` (n, m) onto level coordinates ``y`` in [0, L-1] per
    dimension, with ``dy/dt``; the level of t is ``round(y)`` and its value
    ``(round(y) - centre) / width``. Returns y, dy/dt, centre, width (m,).

    - ``symmetric`` (lucidrains ``symmetry_preserving_bound``, arXiv 2411.19842 sec. 3.2):
      ``y = (L-1)(tanh t + 1)/2``, values ``2k/(L-1) - 1``: L levels symmetric about 0
      in [-1, 1] for every L (``floor(y + 1/2)`` is the rounding);
    - else the FSQ paper's (lucidrains ``FSQ.bound``, "adapted from Jax version in
      Appendix A.1"): ``y = tanh(t + shift) half_l - offset + L//2``, ``half_l =
      (L-1)(1+eps)/2``, ``offset = 0.5`` for even L, ``shift = atanh(offset/half_l)``,
      values ``k/(L//2) - 1``: for even L one more level below 0 than above (L = 2:
      {-1, 0}).
    """
    L = np.asarray(levels, dtype=float)
    if symmetric:
        th = np.tanh(T)
        return (L - 1) * (th + 1) / 2, (L - 1) / 2 * (1 - th ** 2), (L - 1) / 2, (L - 1) / 2
    half_l, hw = (L - 1) * (1 + eps) / 2, np.floor(L / 2)
    offset = np.where(L % 2 == 0, 0.5, 0.0)
    th = np.tanh(T + np.arctanh(offset / half_l))
    return th * half_l - offset + hw, half_l * (1 - th ** 2), hw, hw


def fsq_codebook(a, levels, symmetric=True):
    """The implicit codebook (prod L, m): ``a * (k - centre) / width`` for every level
    combination k, in the index order of :func:`fsq_assign` (the first dimension varies
    fastest)."""
    _, _, centre, width = fsq_bound(np.zeros((1, len(levels))), levels, symmetric)
    grids = np.meshgrid(*[np.arange(int(L)) for L in levels], indexing="ij")
    k = np.stack([g.ravel(order="F") for g in grids], axis=1)       # (prod L, m)
    return a * (k - centre) / width


def fsq_assign(Z, s, levels, symmetric=True):
    """FSQ's cell of each latent: ``round(bound(s z))`` per dimension, as an index into
    :func:`fsq_codebook` (``sum_d k_d prod_{e<d} L_e``)."""
    k = np.round(fsq_bound(Z * s, levels, symmetric)[0])       # 0 .. L-1 per dimension
    basis = np.cumprod([1] + [int(L) for L in levels[:-1]])
    return (k @ basis).astype(np.intp)


def fsq_loss(W, V, params, X, delta, hp):
    """FSQ's loss from its definition with the rounding offset ``delta`` (B, m) fixed:
    ``mean ||x - q~ Dec||^2``, ``q~ = a * (bound(s z) + delta - centre) / width``; any
    one of W, V (the decoder, None: W), s, a may be a stack (P, ...): then (P,) losses."""
    Z = X @ np.swapaxes(W, -1, -2)                          # (…, B, m)
    y, _, centre, width = fsq_bound(Z * params["s"][..., None, :], params["levels"], hp.symmetric)
    F = params["a"][..., None, :] * (y + delta - centre) / width
    Dec = W if V is None else V
    Y = Z if V is None else X @ np.swapaxes(V, -1, -2)
    G = Dec @ np.swapaxes(Dec, -1, -2)                      # (…, m, m)
    recon = np.sum(X * X) - 2 * np.sum(Y * F, axis=(-2, -1)) + np.sum((F @ G) * F, axis=(-2, -1))
    return recon / X.shape[0]


def fsq_freeze(W, V, params, X, hp, rng=None):
    """The straight-through rounding offset ``delta = sg(round(y) - y)`` (B, m) at this point."""
    y = fsq_bound(latents(X, W) * params["s"], params["levels"], hp.symmetric)[0]
    return np.round(y) - y


def fsq_grads(W, V, params, X, delta, hp):
    """Loss and gradients of FSQ in the linear model (Mentzer et al., ICLR 2024; their
    Colab ``FSQ.quantize`` and lucidrains ``finite_scalar_quantization.py``), with the
    adaptation to an orthonormal encoder: a learned input scale s and output scale a,
    ``q~ = a * round_ste(bound(s z))`` in level values, ``x^ = q~ W`` (or ``q~ V``), the
    rounding straight through (``delta`` from :func:`fsq_freeze`). No VQ loss terms."""
    B, s, a = X.shape[0], params["s"], params["a"]
    Z = latents(X, W)                                       # (B, m)
    y, dy, centre, width = fsq_bound(Z * s, params["levels"], hp.symmetric)
    zhat = (y + delta - centre) / width                     # (B, m) the levels, straight through
    F = a * zhat                                            # forward value
    Dec = W if V is None else V
    Y = Z if V is None else latents(X, V)
    FG = F @ (Dec @ Dec.T)
    loss = (np.einsum("bd,bd->", X, X) - 2 * np.einsum("bm,bm->", Y, F) + np.einsum("bm,bm->", FG, F)) / B
    g = (-2.0 / B) * (Y - FG)                               # gradient reaching q~
    slope = dy / width                                      # d zhat / d(s z)
    gDec = ((2.0 / B) * (F.T @ F)) @ Dec - t_dot((2.0 / B) * F, X)
    gW = t_dot(g * a * slope * s, X) + (gDec if V is None else 0.0)   # through the bound, per dimension
    grads = {"s": np.sum(g * a * slope * Z, axis=0), "a": np.sum(g * zhat, axis=0)}
    return Step(float(loss), gW, None if V is None else gDec, grads)


def fsq_init(problem, hp):
    """Input and output scales started at ``s = 1/sd(z)``, ``a = sd(z)`` of the start
    encoder's training latents; the levels ``--fsq_levels``, else allotted by those
    latents' variances (:func:`fsq_levels`)."""
    sd = latents(problem.X_train, problem.W0).std(axis=0)
    levels = hp.fsq_levels or fsq_levels(hp.K, hp.m, sd.astype(np.float64) ** 2)
    return {"s": 1 / sd, "a": sd.astype(np.float64), "levels": np.array(levels, dtype=float)}


def fsq_cells(params, hp):
    """Its own cells: the rounding of :func:`fsq_assign` at the scale ``s``."""
    s, levels = params["s"].copy(), params["levels"]
    return lambda Z: fsq_assign(Z, s, levels, hp.symmetric)


def fsq_skip(problem, hp):
    return None if hp.K >= 2 ** hp.m else f"K={hp.K} < 2^m={2 ** hp.m}: a dimension with one level"


def fsq_note(problem, hp):
    """Its levels, and the best product quantizer with those levels as its reference: the
    PCA floor plus Lloyd-Max per principal direction, the levels by variance."""
    levels = hp.fsq_levels or fsq_levels(hp.K, hp.m, latents(problem.X_train, problem.W0).var(axis=0))
    lam = np.sort(problem.lam)[::-1]
    reference = lam[hp.m:].sum() + sum(v * lloyd_max(L) for v, L in zip(lam, sorted(levels, reverse=True)))
    return (f"levels {list(levels)} ({'symmetric' if hp.symmetric else 'asymmetric'}): {math.prod(levels)} "
            f"codes; the best product quantizer with these levels: {reference:.4g}")


# --- Fitted methods: the k-means reference and exact alternating minimisation

def fit_pca_lloyd(problem, hp):
    """PCA encoder + k-means codebook: the reference, and the start of every trained
    method with ``--start kmeans``."""
    return Result(W=problem.W_pca.copy(), E=problem.E_kmeans.copy(), seconds=problem.start_seconds)


def procrustes_lloyd(X, W, E, max_rounds=500, tol=1e-10, train_encoder=True, on_round=None):
    """Exact alternating minimisation of the training reconstruction error.

    Each round: W <- polar factor of ``Q^T X`` (orthogonal Procrustes, assignments and
    E fixed), then E <- the centroids of the latents, then reassignment. No step
    increases ``mean ||x - q W||^2``. Stops when the relative improvement of a round is
    below ``tol`` or after ``max_rounds``. With ``train_encoder`` false W stays: Lloyd.

    One pass over X per round: with ``S`` the per-cluster sums of the rows of X (K, D),
    kept up to date as points change cluster, ``Q^T X = E^T S`` and the centroids of
    ``Z = X W^T`` are ``S W^T / counts``. The reassignment searches only the points whose
    bound says they might change code (as :func:`lloyd` does), with the labels of a full
    search (tested). Returns W (m, D), E (K, m) and the training error before round 1
    and after each round; ``on_round(r, W, E)``, if given, sees the model after round r.
    """
    K = E.shape[0]
    x_sq = np.einsum("nd,nd->n", X, X, dtype=np.float64)
    z_max = float(x_sq.max(initial=0.0))                    # ||z|| <= ||x||: W has orthonormal rows
    Z = latents(X, W)                                       # (n, m)
    labels, dist, d2 = nearest(Z, E, second=True)
    low = np.sqrt(np.maximum(d2.astype(np.float64) - _distance_eps(E, z_max), 0))
    history = [float(reconstruction_errors(x_sq, Z, E, W, (labels, dist))[0].mean())]
    counts = np.bincount(labels, minlength=K)
    S = np.zeros((K, X.shape[1]))
    np.add.at(S, labels, X)                                 # (K, D) float64 sums of x per cluster
    for _ in range(max_rounds):
        if train_encoder:
            W = stiefel_project(E.astype(np.float64).T @ S).astype(X.dtype)   # (m, D) Procrustes
        has = counts > 0                                    # an empty cluster keeps its code
        E_old, E = E, E.astype(np.float64)                  # (moving points would break descent)
        E[has] = (S[has] @ W.T.astype(np.float64)) / counts[has, None]
        E = E.astype(X.dtype)
        Z_old, Z = Z, latents(X, W)
        # reassignment: ``low`` bounds the distance to every other code; it falls by how
        # far the point and the codes moved (triangle inequality). Only points whose own
        # code might no longer be the nearest, with room for rounding, are searched.
        code_move = np.sqrt(np.max(np.sum((E - E_old.astype(np.float64)) ** 2, axis=1)))
        low -= (np.sqrt(np.einsum("nm,nm->n", Z - Z_old, Z - Z_old)) + code_move) * (1 + _SAFE)
        diff = Z - E[labels]
        dist = np.einsum("nm,nm->n", diff, diff)            # to the own code, directly
        eps = _distance_eps(E, z_max)
        cand = np.flatnonzero(dist + 2 * eps >= np.maximum(low, 0) ** 2)
        new = labels.copy()
        new[cand], dist[cand], d2 = nearest(Z[cand], E, second=True)
        low[cand] = np.sqrt(np.maximum(d2.astype(np.float64) - eps, 0))
        moved = cand[new[cand] != labels[cand]]             # S follows the points that moved
        np.subtract.at(S, labels[moved], X[moved])
        np.add.at(S, new[moved], X[moved])
        labels, counts = new, np.bincount(new, minlength=K)
        history.append(float(reconstruction_errors(x_sq, Z, E, W, (labels, dist))[0].mean()))
        if on_round is not None:
            on_round(len(history) - 1, W, E)
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return W, E, history


def fit_procrustes_lloyd(problem, hp):
    """Alternating Lloyd / orthogonal-Procrustes steps from the trained methods' start;
    its logs score the model after every round as the training loop scores a step
    (``"step"`` counts rounds), so the training curves show where it goes and ends."""
    c = problem.cfg
    rounds = []

    def score(r, W, E):
        rounds.append({"step": r, **eval_metrics(problem, W, E), **curve_point(problem, W, E)})
    score(0, problem.W0, problem.E0)
    W, E, hist = procrustes_lloyd(problem.X_train, problem.W0, problem.E0, c.pl_rounds, c.pl_tol,
                                  c.train_encoder, on_round=score)
    return Result(W=W, E=E, logs={"train_recon_mse": hist, "eval": rounds})


# The one registry: a method is one entry. Reports, plots, summary.json and the sweeps
# list the methods in this order. Each gradient method's ``recipe`` is its authors'
# (--recipe authors): the file it follows is named above it, and where it differs, why.
# Rates are not part of a recipe: they are tuned (sweeps.py --tune).
METHODS: dict[str, Method] = {
    "pca_lloyd": Method("PCA + Lloyd", "Lloyd 1982; k-means++: Arthur and Vassilvitskii 2007",
                        fit=fit_pca_lloyd),
    # deepmind/sonnet sonnet/src/nets/vqvae.py VectorQuantizer (reduce_mean losses,
    # commitment_cost 0.25) and examples/vqvae_example.ipynb (Adam)
    "fd_ste": dataclasses.replace(
        vq_method("FD STE (autograd stand-in)", "Bengio et al. 2013"),
        loss_and_grads=fd_ste_loss_and_grads, skip=fd_ste_budget, hand_derived=False,
        recipe=lambda c: per_element(c, 1.0, 0.25, optimizer="adam")),
    "manual_ste": vq_method("Manual STE", "Bengio et al. 2013; van den Oord et al. 2017",
                            recipe=lambda c: per_element(c, 1.0, 0.25, optimizer="adam")),
    # cfifty/rotation_trick src/train_utils/utils.py get_opt (AdamW, betas (0.9, 0.99), weight
    # decay 1e-4 in src/scripts.sh) and src/models/vq_vae.py (commitment 1). Their Table-1
    # codebook learns by lucidrains' EMA (decay 0.8); here by its gradient, as the estimator's
    # own comparison with STE needs
    "rotation": vq_method("Rotation trick", "Fifty et al., ICLR 2025 (Table-1 code)", "rotation",
                          recipe=lambda c: per_element(c, 1.0, 1.0, optimizer="adamw", betas=(0.9, 0.99),
                                                       weight_decay=1e-4)),
    # STE encoder (reconstruction + commitment), the codebook by moving averages; sonnet
    # VectorQuantizerEMA (decay 0.99, epsilon 1e-5, commitment 0.25) with Adam
    "ema_ste": vq_method("EMA STE", "van den Oord et al. 2017, app. A.1; DeepMind Sonnet",
                         weights=lambda hp: (0.0, hp.beta), init=ema_init, codebook_grads=lambda p, gE, hp: {},
                         update=ema_update, reset=ema_reset, hyperparameters=(
                             ("debias", 1.0, "1: Sonnet's debiased averages; 0: Fang et al.'s simulation's "
                                             "(no debiasing, averages from the start codes, every code recomputed)"),),
                         recipe=lambda c: per_element(c, 0.0, 0.25, optimizer="adam", ema_decay=0.99, ema_eps=1e-5)),
    "procrustes_lloyd": Method("Procrustes-Lloyd", "alternating exact minimisation", fit=fit_procrustes_lloyd),
    # cfifty/rotation_trick exp_weights_and_configs/table_3/rot_vqgan.py, VQModel.get_rotation:
    # the gradient flows through z/||z||; taming's VectorQuantizer(beta=0.25) with legacy
    # weights (commitment 1, codebook 0.25) and Adam betas (0.5, 0.9) (configure_optimizers)
    "rotation_unit": vq_method("Rotation trick (unit z)", "Fifty et al., ICLR 2025 (VQGAN code)",
                               "rotation_unit", in_default=False,
                               recipe=lambda c: per_element(c, 0.25, 1.0, optimizer="adam", betas=(0.5, 0.9))),
    # MHVali/Noise-Substitution-in-Vector-Quantization NSVQ.forward: no VQ loss terms, the
    # codebook learns through ||z - q||; scored with the nearest code, as NSVQ.inference.
    # train.py: Adam, and replace_unused_codebooks every 1,000 of 20,000 batches (threshold
    # 0.01, none in the last two periods): here every twentieth of the steps
    "nsvq": vq_method("NSVQ", "Vali and Backstrom, IEEE Access 2022", "nsvq", weights=lambda hp: (0.0, 0.0),
                      stochastic=True, in_default=False,
                      recipe=lambda c: {"optimizer": "adam", "replace_every": max(1, c.steps // 20),
                                        "replace_below": 0.01}),
    # AaltoML/DiVeQ vqvae_compression/diveq.py DIVEQ.forward: no VQ loss terms;
    # _replace_unused_entries (every replacement_iters = 100, discard_threshold 0.01: here every
    # twentieth of the steps, as NSVQ's) and train.py's Adam in its recipe
    "diveq": vq_method("DiVeQ", "Vali, Backstrom and Solin, ICLR 2026", "diveq", weights=lambda hp: (0.0, 0.0),
                       stochastic=True, in_default=False,
                       hyperparameters=(("noise", 1e-3, "standard deviation of the direction's noise "
                                                        "(0: DiVeQ-Detach)", (1e-4, 1e-1)),),
                       recipe=lambda c: {"optimizer": "adam", "replace_every": max(1, c.steps // 20),
                                         "replace_below": 0.01}),
    # minyoungg/vqtorch nn/vq.py VectorQuant, nn/affine.py; s = t = 0 at the start, C the
    # shared start codebook. examples/autoencoder.py: AdamW (PyTorch's weight decay 0.01),
    # loss 10 x (0.95 codebook + 0.05 commitment) in per-element means, sync_nu 2, affine_lr 2;
    # README's inplace_optimizer (with --affine_ste_alternate 1): SGD at rate 50, momentum 0.9
    "affine_ste": vq_method("Affine STE + sync", "Huh et al., ICML 2023",
                            weights=lambda hp: (hp.alpha, 0.0 if hp.alternate else hp.beta),
                            init=lambda problem, hp: {"C": problem.E0.astype(np.float64), "s": np.zeros(hp.m),
                                                      "t": np.zeros(hp.m)},
                            codebook=affine_codebook, codebook_grads=affine_grads, update=affine_update,
                            reset=affine_reset, shared=("s", "t"), in_default=False, hyperparameters=(
                                ("a", 2.0, "affine learning-rate multiplier (vqtorch affine_lr)", (1.0, 10.0)),
                                ("nu", 2.0, "synchronized commitment (vqtorch sync_nu)"),
                                ("alternate", 0.0, "1: the alternating optimisation (codes first)"),
                                ("inner_lr", 1.0, "the codes' own step of the alternating optimisation"),
                                ("inner_momentum", 0.0, "its heavy-ball momentum")),
                            recipe=lambda c: per_element(c, 9.5, 0.5, optimizer="adamw", weight_decay=0.01,
                                                         a=2.0, nu=2.0, inner_lr=50.0, inner_momentum=0.9)),
    # youngsheen/SimVQ taming/modules/vqvae/quantize.py SimVQ: the frozen basis C is the
    # shared start codebook with P = I, b = 0 (the authors draw it from N(0, 1/m): the start
    # regime is ours to vary); dL/dP = G^T C, dL/db = sum_j G_j. configs/imagenet_simvq_128_B.yaml
    # (beta 0.25, legacy false: codebook 1, commitment 0.25) and taming/models/vq.py (Adam (0.5, 0.9))
    "simvq": vq_method("SimVQ", "Zhu et al., arXiv 2411.02038", init=simvq_init,
                       codebook=simvq_codebook, codebook_grads=lambda p, gE, hp: {"P": gE.T @ p["C"], "b": gE.sum(0)},
                       reset=simvq_reset, shared=("P", "b"), in_default=False, hyperparameters=(
                           ("linear_init", 0.0, "0: P = I, b = 0; 1: Fang et al.'s linear quantizer "
                                                "(nn.Linear's init, the basis about its centre)"),),
                       recipe=lambda c: per_element(c, 1.0, 0.25, optimizer="adam", betas=(0.5, 0.9))),
    # Fang et al.'s simulation (VQ-Research/Wasserstein-VQ SimulationAnalyses/
    # DistributionalMatchingPerspective/GaussianDistribution/VariousVQs.py): the codebook loss by
    # the optimizer, then online_update's anchors. CVQ-VAE trains it inside a VQ-VAE: no
    # authors' recipe here beyond that study's (sweeps.py --preset fang2025)
    "online": vq_method("Online clustering", "Zheng and Vedaldi, ICCV 2023 (CVQ-VAE)",
                        init=lambda problem, hp: {"E": problem.E0.copy(), "prob": np.zeros(hp.K)},
                        anchor=online_anchor, in_default=False,
                        hyperparameters=(("decay", 0.9, "decay of the codes' running usage"),)),
    # VQ-Research/Wasserstein-VQ code/VQGAN/models/wasserstein_quantizer.py (codebook alpha 1,
    # commitment beta 0.2, gamma 1 in the scripts, per-element means, the latents' statistics
    # detached) and train_VQ_transplant.py (AdamW, betas (0.9, 0.95), weight decay 1e-5)
    "wasserstein": dataclasses.replace(
        vq_method("STE + Wasserstein", "Fang et al., arXiv 2506.15078"),
        loss=wasserstein_loss, loss_and_grads=wasserstein_loss_and_grads, in_default=False,
        hyperparameters=(("weight", 1.0, "weight of the Wasserstein distance"),
                         ("encoder", 0.0, "1: its gradient reaches the encoder through the latents "
                                          "(the authors detach them)"),
                         ("exact", 1.0, "1: the exact Gaussian W2; 0: the simulation's eigh of S_z S_c "
                                        "(Fang et al.'s VariousVQs.py)")),
        recipe=lambda c: per_element(c, 1.0, 0.2, optimizer="adamw", betas=(0.9, 0.95), weight_decay=1e-5,
                                     weight=1.0 * c.D)),
    # Mentzer et al.'s Colab FSQ.quantize and lucidrains finite_scalar_quantization.py:
    # scored with its own rounding cells; it does not share the start codebook. Its recipe:
    # the paper's Table-1 levels where it has (K, m), with the paper's bound (lucidrains
    # refuses L = 2 without preserve_symmetry: elsewhere symmetric). The paper trains FSQ
    # inside MaskGIT and UViM with their optimizers: the shared one stays
    "fsq": Method("FSQ", "Mentzer et al., ICLR 2024", init=fsq_init,
                  codebook=lambda params, hp: fsq_codebook(params["a"], params["levels"], hp.symmetric),
                  freeze=fsq_freeze, loss=fsq_loss, loss_and_grads=fsq_grads, assign=fsq_cells, skip=fsq_skip,
                  note=fsq_note, in_default=False, hyperparameters=(
                      ("symmetric", 1.0, "1: levels symmetric about 0 for every L (lucidrains "
                                         "preserve_symmetry); 0: the paper's bound"),),
                  recipe=lambda c: {"fsq_levels": FSQ_TABLE.get((c.K, c.m), c.fsq_levels),
                                    "symmetric": 0.0 if (c.K, c.m) in FSQ_TABLE else 1.0}),
}


def declared_params():
    """Every registered method's hyperparameters: flag name -> (default, help)."""
    return {f"{m}_{n}": (d, h) for m, meth in METHODS.items() for n, d, h, *_ in meth.hyperparameters}


def default_methods():
    """The methods run when none are named: every registered one not marked opt-in."""
    return tuple(name for name, m in METHODS.items() if m.in_default)


def method_table():
    """The registry as a Markdown table (the README's, tested to match); the authors'
    recipes as they read at the default sizes (D=64, m=4)."""
    rows = ["| key | name | from | gradient estimator | noise | by default | hyperparameters (flag: default) "
            "| authors' recipe (`--recipe authors`) |", "|---|---|---|---|---|---|---|---|"]
    for key, m in METHODS.items():
        params = ", ".join(f"`--{key}_{n}` {d:g}" + (f" (tunable in [{span[0][0]:g}, {span[0][1]:g}])" if span else "")
                           for n, d, _, *span in m.hyperparameters) or "-"
        recipe = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in (m.recipe(Config()) if m.recipe else {}).items() if v != ()) or "-"
        rows.append(f"| `{key}` | {m.label} | {m.paper} | {m.estimator or '-'} | "
                    f"{'yes' if m.stochastic else 'no'} | {'yes' if m.in_default else 'opt-in'} | {params} | {recipe} |")
    return "\n".join(rows)


def method_label(spec):
    """A method's name in reports: its registry label, and a variant's own settings."""
    name, own = parse_spec(spec)
    label = METHODS[name].label if name in METHODS else name
    return label + (" " + spec[len(name):] if own else "")


# --------------------------- The training loop: one for every gradient method

def batches(problem):
    """The training batches ``(t, X_b)``, t = 1..steps, the same for every method: drawn
    with replacement from the training set (the ``"batches"`` stream), or with
    ``fresh_batches`` drawn anew from the true distribution (the ``"fresh"`` stream: no
    sample seen twice, as a study on an endless source runs)."""
    cfg, X = problem.cfg, problem.X_train
    if not cfg.fresh_batches:
        rng = derived_rng(cfg.seed, "batches")
        for t in range(1, cfg.steps + 1):
            yield t, X[rng.integers(0, X.shape[0], size=cfg.batch)]        # (B, D)
        return
    rng = derived_rng(cfg.seed, "fresh")
    scale = problem.U * np.sqrt(problem.lam)                # (D, rank): x = scale @ g, g ~ N(0, I)
    for t in range(1, cfg.steps + 1):
        if cfg.family == "gaussian":
            Xb = rng.standard_normal((cfg.batch, scale.shape[1])) @ scale.T
        else:
            Xb = family_draw(cfg.family, rng, cfg.batch, problem.lam, cfg.m) @ problem.U.T
        yield t, Xb.astype(X.dtype, copy=False)


def finite(step):
    return math.isfinite(step.loss) and all(
        g is None or np.isfinite(g).all() for g in (step.gW, step.gV, *step.grads.values()))


class Run:
    """One gradient method's training, a batch at a time: what :func:`train` carries from
    step to step (parameters, optimizer, code counts, iterate sums, logs).

    The method runs with its own settings (:func:`method_config`: its authors' recipe
    under ``--recipe authors``, a variant's own). Each step: the method freezes its
    surrogate on the batch (noise from its own stream), takes its non-gradient step if it
    has one, gives its loss and gradients; the :class:`Optimizer` steps W (Riemannian,
    unless ``train_encoder`` is 0) at ``lrW``, the untied decoder V at ``lrV`` and every
    parameter the method trains at ``lrE`` (under sgd and momentum ``lrE / K`` for those
    shared by the K codes, whose gradients sum over them), all times :func:`lr_factor`.
    Then, for every method:
    dead codes (``dead_threshold > 0``, lucidrains' ``threshold_ema_dead_code``): each
    code's count per batch before the step is averaged, ``N_j <- d N_j + (1-d) n_j`` from
    ``N_j = 1``; a code with ``N_j < dead_threshold`` after the step takes a latent of the
    batch (without replacement when it has enough) through the method's ``reset`` (or
    into its parameter ``E``; not for a method with its own cells) and ``N_j`` is set to
    the threshold; or, with ``replace_every``, the periodic replacement (:meth:`renew`);
    a method's own step after the optimizer's (``anchor``, online clustering's);
    tail averaging (the mean of the last iterates, W projected back); logs
    (batch loss, re-seeded codes, every ``log_every`` steps the eval metrics and the
    curve's point, :func:`curve_point`; with ``eval_every``, at step 1 and every
    ``eval_every`` steps :func:`fresh_metrics`, in ``logs["fresh"]``). A non-finite loss, gradient or parameter, or an
    eval error above ``DIVERGED`` times the start's, stops the run as diverged.
    """

    def __init__(self, problem, name):
        self.problem, self.name = problem, name
        self.method, cfg = method_config(problem.cfg, name)
        self.cfg, self.hp = cfg, hyperparameters(cfg, name)
        self.W = problem.W0.copy()
        self.V = None if problem.V0 is None else problem.V0.copy()
        self.params = self.method.init(problem, self.hp)
        self.E = self.codebook(self.params)
        per_code = cfg.optimizer in ("sgd", "momentum")     # Adam's steps do not grow with the sum over K
        rates = {"W": cfg.lrW, "V": cfg.lrV or cfg.lrW,
                 **{k: cfg.lrE / (cfg.K if k in self.method.shared and per_code else 1) for k in self.params}}
        self.optimizer = Optimizer(rates, cfg.optimizer, cfg.momentum, cfg.betas, cfg.weight_decay)
        self.noise, self.reseed_rng = derived_rng(cfg.seed, "noise"), derived_rng(cfg.seed, "reseed")
        resettable = self.method.assign is None and (self.method.reset is not None or "E" in self.params)
        self.reseeds = cfg.dead_threshold > 0 and resettable
        self.replaces = cfg.replace_every > 0 and resettable
        self.counts = np.ones(self.E.shape[0])
        self.used = np.zeros(self.E.shape[0])               # batches each code was used in (replacement)
        self.tail_from = cfg.steps - math.ceil(cfg.tail_average * cfg.steps) + 1
        self.sums = [np.zeros(self.W.shape), np.zeros(self.E.shape), np.zeros(self.W.shape)]
        self.status, self.diverged_at_step, self.note = "ok", None, ""
        self.logs = {"batch_loss": [], "reseeded": [], "eval": [self.eval_row(0)]}
        if cfg.eval_every:                                  # the same samples for every method
            self.monitor = derived_rng(cfg.seed, "monitor")
            self.logs["fresh"] = [self.fresh_row(0)]

    def codebook(self, params):
        return self.method.codebook(params, self.hp).astype(self.problem.W0.dtype, copy=False)

    def cells(self):
        return None if self.method.assign is None else self.method.assign(self.params, self.hp)

    def eval_row(self, t):
        model = (self.problem, self.W, self.E, self.V, self.cells())
        return {"step": t, **eval_metrics(*model), **curve_point(*model)}

    def fresh_row(self, t):
        return {"step": t, **fresh_metrics(self.problem, self.monitor, self.W, self.E, self.V, self.cells())}

    def stop(self, t, note):
        self.status, self.diverged_at_step, self.note = "diverged", t, note
        return False

    def step(self, t, Xb):
        """One training step on the batch ``Xb`` (B, D); False once the run has stopped."""
        m, hp, cfg, opt = self.method, self.hp, self.cfg, self.optimizer
        try:
            frozen = m.freeze(self.W, self.V, self.params, Xb, hp, self.noise)
            params, frozen = m.update(self.params, frozen, hp) if m.update else (self.params, frozen)
            st = m.loss_and_grads(self.W, self.V, params, Xb, frozen, hp)
            ok = finite(st)
            if ok:
                f = lr_factor(cfg, t)
                W = opt.step("W", self.W, st.gW, f) if cfg.train_encoder else self.W
                V = None if self.V is None else opt.step("V", self.V, st.gV, f)
                params = {**params, **{k: opt.step(k, params[k], g, f) for k, g in st.grads.items()}}
                if m.anchor:
                    params = m.anchor(params, latents(Xb, W), hp)
                E = self.codebook(params)
                ok = np.isfinite(W).all() and np.isfinite(E).all() and (V is None or np.isfinite(V).all())
        except np.linalg.LinAlgError:
            ok = False
        if not ok:                     # the last finite parameters are kept
            return self.stop(t, f"non-finite loss or parameters at step {t}")
        if self.reseeds or self.replaces:
            params, E = self.renew(t, latents(Xb, self.W), params, E)
        self.W, self.V, self.params, self.E = W, V, params, E
        self.logs["batch_loss"].append(float(st.loss))
        if t >= self.tail_from:
            for acc, x in zip(self.sums, (W, E, V)):
                if x is not None:
                    acc += x
        if t % cfg.log_every == 0 or t == cfg.steps:
            row = self.eval_row(t)
            if not row["recon_mse"] <= DIVERGED * self.logs["eval"][0]["recon_mse"]:
                return self.stop(t, f"eval error {row['recon_mse']:.3g} at step {t}, over {DIVERGED:g}x its start")
            self.logs["eval"].append(row)
        if cfg.eval_every and (t == 1 or t % cfg.eval_every == 0):
            self.logs["fresh"].append(self.fresh_row(t))
        return True

    def renew(self, t, Z, params, E):
        """Dead codes after the step, from the batch's latents ``Z`` before it: the
        moving-average rule (``--dead_threshold``) or the periodic replacement
        (``--replace_every``); returns the parameters and codebook."""
        cfg, K = self.cfg, E.shape[0]
        n_j = np.bincount(nearest(Z, self.E)[0], minlength=K)
        if self.reseeds:
            self.counts = cfg.dead_decay * self.counts + (1 - cfg.dead_decay) * n_j
            dead = np.flatnonzero(self.counts < cfg.dead_threshold)
            if dead.size:
                values = Z[self.reseed_rng.choice(len(Z), size=dead.size, replace=dead.size > len(Z))]
                self.counts[dead] = cfg.dead_threshold
        else:   # NSVQ replace_unused_codebooks, DiVeQ _replace_unused_entries: a copy of a used
            # code (drawn by its use, as DiVeQ's), 1e-9 apart; NSVQ's last two periods replace nothing
            self.used += n_j > 0
            dead = np.empty(0, dtype=np.intp)
            if t % cfg.replace_every == 0:
                rate = self.used / cfg.replace_every
                used = np.flatnonzero(rate >= cfg.replace_below)
                if t <= cfg.steps - 2 * cfg.replace_every and used.size:
                    dead = np.flatnonzero(rate < cfg.replace_below)
                self.used[:] = 0
            if dead.size:
                pick = self.reseed_rng.choice(used, size=dead.size, p=rate[used] / rate[used].sum())
                values = E[pick] + 1e-9 * self.reseed_rng.standard_normal((dead.size, E.shape[1]))
        if dead.size:
            params = (self.method.reset or reset_codes)(params, dead, values, self.hp)
            E = self.codebook(params)
        self.logs["reseeded"].append(int(dead.size))
        return params, E

    def result(self):
        """The trained model (the tail average when asked for) and how the run went."""
        W, E, V, cfg = self.W, self.E, self.V, self.cfg
        if self.status == "ok" and cfg.tail_average > 0 and cfg.steps > 0:
            n_avg = cfg.steps - self.tail_from + 1
            W = stiefel_project(self.sums[0] / n_avg).astype(W.dtype)
            E = (self.sums[1] / n_avg).astype(E.dtype)
            V = None if V is None else (self.sums[2] / n_avg).astype(V.dtype)
        notes = [self.note, f"{sum(self.logs['reseeded'])} codes re-seeded" if self.reseeds or self.replaces else "",
                 self.method.note(self.problem, self.hp) if self.method.note else ""]
        return Result(W, E, V, self.cells(), self.params, self.status, self.diverged_at_step,
                      " ".join(n for n in notes if n), self.logs)


def train(problem, name):
    """Train the registered gradient method ``name`` from the problem's start on the
    shared batches (see :class:`Run`); returns its :class:`Result`."""
    run = Run(problem, name)
    with np.errstate(all="ignore"):                         # overflow is detected, not warned about
        for t, Xb in batches(problem):
            problem.progress(f"training {name}", t - 1, problem.cfg.steps)
            if not run.step(t, Xb):
                break
    return run.result()


# --------------------------------- The gradient checker: one for every method

def gradient_errors(method, hp, W, V, params, Xb, rng=None, h=1e-5, n_coords=None):
    """A gradient method's hand-derived gradients against :func:`central_differences` of
    its own ``loss``, over W, V and every parameter it trains, at one point and batch
    (in float64; ``rng``: its noise, and the entries checked when ``n_coords`` limits
    them per tensor). Returns largest difference over largest entry, per tensor:
    {"gW_rel_err": W and V, "params_rel_err": its own, "loss_rel_err", "coords"}.
    """
    W, Xb = np.asarray(W, dtype=np.float64), np.asarray(Xb, dtype=np.float64)
    V = None if V is None else np.asarray(V, dtype=np.float64)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    frozen = method.freeze(W, V, params, Xb, hp, rng)
    if method.update:
        params, frozen = method.update(params, frozen, hp)
    hand = method.loss_and_grads(W, V, params, Xb, frozen, hp)
    point = {"W": W, **({} if V is None else {"V": V}), **{k: params[k] for k in hand.grads}}

    def loss(p):
        return method.loss(p["W"], p.get("V"), {**params, **{k: p[k] for k in hand.grads}}, Xb, frozen, hp)
    coords = None
    if n_coords is not None and any(a.size > n_coords for a in point.values()):
        coords = {k: rng.choice(a.size, min(n_coords, a.size), replace=False) for k, a in point.items()}
    fd = central_differences(loss, point, h, coords)
    err = {k: rel_err(fd[k], g) for k, g in (("W", hand.gW), ("V", hand.gV), *hand.grads.items()) if k in point}
    return {"gW_rel_err": max(err["W"], err.get("V", 0.0)),
            "params_rel_err": max([err[k] for k in hand.grads] + [0.0]),
            "loss_rel_err": abs(float(loss(point)) - hand.loss) / max(abs(hand.loss), 1e-300),
            "coords": "all" if coords is None else int(sum(len(i) for i in coords.values()))}


def check_gradients(problem, names):
    """Every hand-derived method of ``names`` checked by :func:`gradient_errors` on the
    first training batch, at the trained methods' start with the parameters each method
    trains moved off it (by 10% of their scale: a parameter that starts at zero or at the
    identity hides nothing then)."""
    c = problem.cfg
    Xb = problem.X_train[derived_rng(c.seed, "batches").integers(0, c.n_train, size=c.batch)]
    W, V = problem.W0.astype(np.float64), None if problem.V0 is None else problem.V0.astype(np.float64)
    n_coords = None if W.size + problem.E0.size <= 2048 else 256
    out = {"point": "the trained methods' start, their own parameters moved by 10%, first training batch",
           "h": c.fd_h, "measure": "max|fd - hand-derived| / max|hand-derived| per tensor"}
    for name in names:
        method, mcfg = method_config(c, name)
        hp = hyperparameters(mcfg, name)
        if method.loss_and_grads is None or not method.hand_derived or (method.skip and method.skip(problem, hp)):
            continue
        rng = derived_rng(c.seed, "gradcheck")
        params = {k: np.asarray(v, dtype=np.float64) for k, v in method.init(problem, hp).items()}
        trained = method.loss_and_grads(W, V, params, Xb, method.freeze(W, V, params, Xb, hp, rng), hp).grads
        for k in trained:
            scale = float(np.sqrt(np.mean(params[k] ** 2))) or 1.0
            params[k] = params[k] + 0.1 * scale * rng.standard_normal(params[k].shape)
        out[name] = gradient_errors(method, hp, W, V, params, Xb, rng, c.fd_h, n_coords)
    return out
# ------------------------------------------------------------- The comparison

class ConfigError(ValueError):
    """An invalid setting; ``flag`` and ``value`` name it."""
    def __init__(self, flag, value, reason):
        super().__init__(f"--{flag} {value}: {reason}")
        self.flag, self.value = flag, value


def check_outdir(outdir, flag="outdir"):
    """Create ``outdir`` (if needed) and write and remove a probe file in it, so that a
    folder that cannot take the results is refused before any work; raises ConfigError."""
    path = os.path.abspath(outdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(flag, outdir, "exists and is not a folder")
    missing = path                                          # the first folder makedirs would create
    while not os.path.exists(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
        missing = os.path.dirname(missing)
    created, probe = not os.path.exists(path), os.path.join(path, f".probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"x")
        os.remove(probe)
    except OSError as e:
        if created and os.path.isdir(missing):
            shutil.rmtree(missing, ignore_errors=True)      # nothing left behind
        raise ConfigError(flag, outdir, f"cannot be written ({e.strerror or e})") from None


def validate_settings(cfg):
    """Raise :class:`ConfigError` for the first invalid value of a field of ``cfg``."""
    def need(ok, flag, reason):
        if not ok:
            raise ConfigError(flag, getattr(cfg, flag), reason)
    kinds = {"int": ("an integer", (int, np.integer)), "str": ("a string", (str,)),
             "float": ("a number", (int, float, np.integer, np.floating))}
    for f in dataclasses.fields(Config):                    # types first: a string is no number
        v, kind = getattr(cfg, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "int" and isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)                                      # 1e6 or 2.0: a whole number
            setattr(cfg, f.name, v)
        if f.name == "data" and isinstance(v, np.ndarray):
            continue                                        # the library may pass an array
        if kind in kinds and (isinstance(v, bool) or not isinstance(v, kinds[kind][1])):
            raise ConfigError(f.name, repr(v), f"must be {kinds[kind][0]}, got {type(v).__name__}")
    for flag in ("D", "rank", "m", "K", "n_train", "n_eval", "batch", "kmeans_iter", "eval_samples"):
        need(getattr(cfg, flag) >= 1, flag, "must be a whole number >= 1")
    for flag in ("steps", "seed", "n_pop", "pl_rounds", "n_init", "log_every", "workers", "eval_every"):
        need(getattr(cfg, flag) >= 0, flag, "must be a whole number >= 0")
    need(cfg.rank <= cfg.D, "rank", f"must be <= D={cfg.D}")
    need(cfg.m <= cfg.D, "m", f"must be <= D={cfg.D}")
    need(cfg.K <= cfg.n_train, "K", f"must be <= n_train={cfg.n_train}")
    for flag in ("lrW", "lrE", "fd_h", "lmax", "lmin"):
        v = getattr(cfg, flag)
        need(math.isfinite(v) and v > 0, flag, "must be positive and finite")
    for flag in ("alpha", "beta", "ema_eps", "dead_threshold", "pl_tol", "fd_max_evals", "shift", "lrV",
                 "weight_decay", "replace_every"):
        v = getattr(cfg, flag)
        need(math.isfinite(v) and v >= 0, flag, "must be finite and >= 0")
    need(cfg.lmin <= cfg.lmax, "lmin", f"must be <= lmax={cfg.lmax}")
    for flag in ("ema_decay", "dead_decay", "tail_average", "momentum", "replace_below", "practical"):
        need(0 <= getattr(cfg, flag) < 1, flag, "must be in [0, 1)")
    for flag, choices in (("start", START_REGIMES), ("family", FAMILIES), ("train_encoder", (0, 1)),
                          ("fresh_batches", (0, 1)),
                          ("decoder", ("tied", "untied")),
                          ("lr_schedule", LR_SCHEDULES), ("dtype", ("float64", "float32")),
                          ("optimizer", OPTIMIZERS), ("recipe", ("shared", "authors"))):
        need(getattr(cfg, flag) in choices, flag, "must be one of " + ", ".join(map(str, choices)))
    need(not cfg.fsq_levels or (len(cfg.fsq_levels) == cfg.m and min(cfg.fsq_levels) >= 2
                                and math.prod(cfg.fsq_levels) <= cfg.K), "fsq_levels",
         f"must be m={cfg.m} whole numbers >= 2 with a product <= K={cfg.K}")
    need(len(cfg.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas), "betas",
         "must be two numbers in [0, 1)")


def contradiction(cfg, varying=()):
    """Raise :class:`ConfigError`, naming both flags, for the first setting of ``cfg``
    that differs from its default but cannot matter: what a field ``needs`` (its
    declaration in :class:`Config`) does not hold, a method's own hyperparameter when
    that method is not run, a batch larger than the training set it is drawn from.
    ``varying``: fields a sweep sets per cell (their needs are checked per cell)."""
    base, declared = Config(), declared_params()
    run = {parse_spec(m)[0] for m in cfg.methods}
    needs = [(f.name, getattr(cfg, f.name), getattr(base, f.name), f.metadata["needs"])
             for f in dataclasses.fields(Config) if f.metadata.get("needs")]
    needs += [(f"{key}_{n}", cfg.method_params[f"{key}_{n}"], declared[f"{key}_{n}"][0], ("methods", key))
              for key, m in METHODS.items() for n, *_ in m.hyperparameters]
    for name, value, default, (other, want) in needs:
        if value == default or other in varying:
            continue
        have = getattr(cfg, other)
        have = "<array>" if isinstance(have, np.ndarray) else have
        if other == "methods":
            if want not in run:
                raise ConfigError(name, value, f"only matters when {want} runs, and --methods does not name it")
        elif want is None and not have:
            raise ConfigError(name, value, f"only matters with --{other} on, and --{other} is {have!r}")
        elif want == ("",) and have != "":
            raise ConfigError(name, value, f"only matters without --{other} (it shapes or draws synthetic "
                                           f"data), and --{other} is {have}")
        elif want is not None and have not in want:
            raise ConfigError(name, value, f"only matters with --{other} {' or '.join(map(str, want))}, "
                                           f"and --{other} is {have}")
    if not cfg.fresh_batches and cfg.batch > cfg.n_train:
        raise ConfigError("batch", cfg.batch, f"is larger than --n_train {cfg.n_train}, the training set it is "
                                             "drawn from (or --fresh_batches 1)")


def validate(cfg, dependencies=True):
    """Raise :class:`ConfigError` for the first invalid setting of ``cfg``; with
    ``dependencies``, also for settings that contradict each other (:func:`contradiction`)."""
    validate_settings(cfg)
    for spec in cfg.methods:
        name, own = parse_spec(spec)
        if name not in METHODS:
            raise ConfigError("methods", spec, "unknown method (known: " + ", ".join(METHODS) + ")")
        mine = [n for n, *_ in METHODS[name].hyperparameters]
        for key in own:
            if key not in RECIPE_KEYS + tuple(mine):
                raise ConfigError("methods", spec, f"{key} is not a setting of a method (known: "
                                  + ", ".join(RECIPE_KEYS + tuple(mine)) + ")")
        if own or cfg.recipe == "authors":
            try:
                validate_settings(method_config(cfg, spec)[1])
            except ConfigError as e:
                raise ConfigError("methods", spec, str(e)) from None
    declared = declared_params()
    for name, v in cfg.method_params.items():
        if name not in declared:
            raise ConfigError(name, v, "unknown method parameter (known: " + ", ".join(declared) + ")")
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(name, v, "must be finite and >= 0")
    if dependencies:
        contradiction(cfg)
    need_bytes, have_bytes = memory_estimate(cfg), available_memory()
    if have_bytes is not None and need_bytes > have_bytes:
        raise ConfigError("n_train", f"{cfg.n_train} --n_eval {cfg.n_eval} --D {cfg.D} --K {cfg.K}",
                          f"needs about {_bytes(need_bytes)} of memory at its peak; this machine has "
                          f"{_bytes(have_bytes)} available")
    if cfg.outdir:
        check_outdir(cfg.outdir)


def memory_estimate(cfg):
    """Bytes a comparison needs at its peak, roughly, from its settings: the data drawn
    in float64 (and a float32 copy), the D x D covariance, its factors and the PCA's
    second moment, the latents and coordinates for the k-means, a population chunk, and
    the interpreters (this one and the pool's)."""
    n, D = cfg.n_train + cfg.n_eval, cfg.D
    data = 8 * n * D * (1.5 if cfg.dtype == "float32" else 1)
    square = 6 * 8 * D * D
    latents = 3 * 8 * cfg.n_train * (cfg.m + cfg.rank)
    population = 2 * 8 * 65536 * (cfg.rank + cfg.m + cfg.K)
    return int(data + square + latents + population + 3 * 150e6)


def available_memory():
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as fh:
            return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def make_config(**settings):
    """A validated :class:`Config` from keyword settings (raises :class:`ConfigError`).

    Resolves the automatic settings: every registered method when none is named, the
    k-means restarts for ``n_init=0`` and the logging interval for ``log_every=0``.
    """
    return build_config(settings)


def build_config(settings, dependencies=True):
    """:func:`make_config` of a dict; ``dependencies=False`` leaves :func:`contradiction`
    to the caller (a sweep checks it once, knowing which fields its cells vary)."""
    settings = dict(settings)
    declared = declared_params()
    known = {f.name for f in dataclasses.fields(Config)} | set(declared)
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(key, settings[key], "unknown setting" + (f" (did you mean --{close[0]}?)" if close else ""))
    given = {k: settings.pop(k) for k in list(settings) if k in declared}
    params = {k: d for k, (d, _) in declared.items()}
    params.update(settings.pop("method_params", None) or {})
    params.update({k: v for k, v in given.items() if v is not None})
    if settings.get("outdir") is None:
        settings.pop("outdir", None)
    if has_data(settings.get("data")):
        settings.update(data_settings(settings))
    cfg = Config(**settings, method_params=params)
    methods = (cfg.methods,) if isinstance(cfg.methods, str) else tuple(cfg.methods)
    cfg.methods = methods or default_methods()
    cfg.betas, cfg.fsq_levels = tuple(cfg.betas), tuple(cfg.fsq_levels)
    validate(cfg, dependencies)
    cfg.n_init = cfg.n_init or auto_restarts(cfg.n_train, cfg.K)
    cfg.log_every = cfg.log_every or max(1, cfg.steps // 20)
    return cfg


DATA_SIZES = ("D", "rank", "n_train", "n_eval", "batch")   # with --data: the data's, unless given


def has_data(data):
    """Whether ``data`` (a path or an array) names data of the user's."""
    return isinstance(data, np.ndarray) or bool(data)


def data_settings(settings):
    """With ``--data``: D and the rank are the data's, the split's sizes fit its rows
    (and the batch the training rows); each given value that contradicts the file is
    refused, in one line."""
    spec = settings["data"]
    if not isinstance(spec, (str, np.ndarray)):
        raise ConfigError("data", repr(spec), f"must be a path or a NumPy array, got {type(spec).__name__}")
    N, D = open_data(spec).shape
    for flag in ("D", "rank"):
        if settings.get(flag) is not None and settings[flag] != D:
            raise ConfigError(flag, settings[flag], f"but --data {data_label(spec)} has D = {D} columns "
                                                    "(the rank is D: leave both out with --data)")
    n_train, n_eval, n_test = data_sizes(N, settings)
    K = settings.get("K", Config().K)
    if N - n_train - n_eval < 2 or n_train < K:
        raise ConfigError("data", data_label(spec), f"{N:,} rows: too few for --n_train {n_train} (at least --K {K}), "
                                        f"--n_eval {n_eval} and at least 2 test rows")
    return {"D": D, "rank": D, "n_train": n_train, "n_eval": n_eval,
            "batch": settings.get("batch") or min(Config().batch, n_train)}


def auto_restarts(n, K, budget=1 << 22):
    """k-means restarts for ``--n_init 0``: 8 while one Lloyd pass (n x K distances)
    stays below ``budget``, then fewer in proportion, at least 1.

    >>> auto_restarts(20000, 32), auto_restarts(100000, 512)
    (8, 1)
    """
    return int(min(8, max(1, round(8 * budget / (n * K)))))


def make_problem(cfg, start=None, pool=None, progress=quiet):
    """The data, the true spectrum and the shared start point of a comparison. ``start``:
    the :meth:`Problem.start` of a problem with the same data settings, to reuse;
    ``pool``: an executor for the k-means restarts (default: one opened and closed here),
    open until the reference is used (:meth:`Problem.unconstrained`)."""
    X_train, X_eval, U, lam, data = problem_data(cfg, progress)
    if start is None and pool is not None:                  # the reference may run on while the methods train
        start = start_point(cfg, X_train, U, pool, progress)()
    elif start is None:
        with process_pool(cfg.workers) as ex:
            W0, E0, seconds, reference = start_point(cfg, X_train, U, ex, progress)()
            start = W0, E0, seconds, reference()
    return Problem(cfg, X_train, X_eval, U, lam, *start, progress=progress, data=data)


def problem_data(cfg, progress=quiet):
    """The training and eval data in ``cfg.dtype``, the eigenbasis U (D, r) and
    eigenvalues (r,) of the true second moment, and the user's mapped data (a
    :class:`DataFile`, or None for synthetic data). With ``--data``, the "true" spectrum
    is the test rows' own (the held-out rows the population error is measured on)."""
    if has_data(cfg.data):
        data = split_data(open_data(cfg.data, check=False), cfg, cfg.data)   # checked with the settings
        U, lam = second_moment_basis(data.rows, data.test if len(data.test) else data.eval, progress)
        return gather(data.rows, data.train, cfg.dtype), gather(data.rows, data.eval, cfg.dtype), U, lam, data
    if cfg.family == "gaussian":
        X_train, X_eval, _ = make_lowrank_data(cfg.D, cfg.rank, cfg.n_train, cfg.n_eval,
                                               cfg.seed, cfg.lmax, cfg.lmin, progress)
        U, lam = lowrank_factor(cfg.D, cfg.rank, cfg.seed, cfg.lmax, cfg.lmin)
    else:                              # the same basis and spectrum, another distribution in it
        rng = np.random.default_rng(cfg.seed)
        U, lam = lowrank_factor(cfg.D, cfg.rank, cfg.seed, cfg.lmax, cfg.lmin, rng)
        X_train, X_eval = (family_draw(cfg.family, rng, n, lam, cfg.m) @ U.T for n in (cfg.n_train, cfg.n_eval))
    return X_train.astype(cfg.dtype, copy=False), X_eval.astype(cfg.dtype, copy=False), U, lam, None


def start_point(cfg, X_train, U, pool, progress=quiet):
    """The PCA encoder W0, the k-means codebook E0 on its latents, and the unconstrained
    reference: k-means with K codes directly in data space (no rank-m restriction), from
    the baseline's restarts' seeds and from the baseline's codebook lifted into data space
    (so never worse on the training data than the baseline), in the coordinates ``X U``
    (n, rank) where the data lie. The restarts are independent: they are submitted to
    ``pool`` at once, and the function returned waits for the baseline's and returns (W0
    (m, D), E0 (K, m), seconds of the start point, a function that waits for the
    reference's and returns it), so that the caller may work meanwhile.
    """
    t0 = time.perf_counter()
    if cfg.D >= 1024:
        progress(f"PCA: eigendecomposition of the {cfg.D} x {cfg.D} second moment")
    W0 = pca_encoder(X_train, cfg.m)
    pca_seconds = time.perf_counter() - t0
    S_train = X_train.astype(np.float64, copy=False) @ U               # (n, rank) coordinates of the data
    base = [pool.submit(kmeans_restart, *a) for a in restart_args(
        latents(X_train, W0), cfg.K, derived_rng(cfg.seed, "kmeans"), cfg.n_init, cfg.kmeans_iter)]
    ref = [pool.submit(kmeans_restart, *a) for a in restart_args(
        S_train, cfg.K, derived_rng(cfg.seed, "unconstrained"), cfg.n_init, cfg.kmeans_iter)]
    n_runs = len(base) + len(ref) + 1

    def results(futures, done):
        out = []
        for f in futures:
            out.append(f.result())
            progress("k-means restarts (start point and reference)", done + len(out), n_runs)
        return out

    def finish():
        base_runs = results(base, 0)
        E0 = best_run(base_runs).E
        lifted = E0.astype(np.float64) @ (W0.astype(np.float64) @ U)   # (K, rank) E0 in data space
        ref.append(pool.submit(kmeans_restart, S_train, cfg.K, None, cfg.kmeans_iter, lifted))

        def reference():                                    # waited for when first needed
            ref_runs = results(ref, len(base_runs))
            return best_run(ref_runs).E, sum(r.seconds for r in ref_runs)
        return W0, E0, pca_seconds + sum(r.seconds for r in base_runs), reference
    return finish


def run_comparison(**settings):
    """Run a comparison: the library and notebook entry point, with the flags' names as
    keywords (see :class:`Config`). Like a scikit-learn estimator it writes nothing unless
    given ``outdir`` and runs in this process unless given ``workers``. Returns a dict
    shaped like ``summary.json``, each method's entry also with its trained ``W`` (m, D),
    ``E`` (K, m), ``V`` and ``logs``. A bad or unknown setting raises :class:`ConfigError`
    before any work."""
    return run(make_config(**settings))


def run(cfg):
    """Run the comparison a validated :class:`Config` describes (see :func:`run_comparison`)."""
    t0 = time.perf_counter()
    with process_pool(cfg.workers) as pool:
        problem = make_problem(cfg, pool=pool, progress=Progress(not cfg.quiet))   # data, the shared start
        summary = compare(problem)                          # every method from that start
    summary["total_seconds"] = time.perf_counter() - t0
    if cfg.outdir:
        write_outputs(summary, cfg.outdir)
    if not cfg.quiet:
        print(format_report(summary))
        if cfg.outdir:
            print(f"\nWrote {cfg.outdir}/summary.json, comparison.png, training_curves.png and logs")
    return summary


def compare(problem, check=True, stream="population"):
    """Run ``problem.cfg.methods`` on a problem and score them; returns the summary dict
    (with ``check`` false, without the gradient checks; ``stream="validation"``: the
    population error on samples of the tuning's own stream, see sweeps.py --tune).

    Settings that change neither the data nor the start point (``steps``, ``beta``, the
    learning rates, ``methods``, ...) may be changed in ``problem.cfg`` between calls.
    """
    cfg = problem.cfg
    records = {}
    for name in cfg.methods:               # each skipped with its reason, fitted, or trained
        t0, (method, mcfg) = time.perf_counter(), method_config(cfg, name)
        hp = hyperparameters(mcfg, name)
        reason = method.skip(problem, hp) if method.skip else None
        records[name] = (Result(status="skipped", note=reason) if reason else
                         method.fit(problem, hp) if method.fit else train(problem, name))
        records[name].seconds += time.perf_counter() - t0
        score(problem, records[name])
    floors, pop = bounds(problem, records), population_scores(problem, records, stream)
    registry = {}
    for name in cfg.methods:
        m, mcfg = method_config(cfg, name)
        key = parse_spec(name)[0]
        registry[name] = {"label": method_label(name), "paper": m.paper, "estimator": m.estimator,
                          "stochastic": m.stochastic,
                          "params": {f"{key}_{k}": mcfg.method_params[f"{key}_{k}"] for k, *_ in m.hyperparameters},
                          "settings": {k: getattr(mcfg, k) for k in RECIPE_KEYS}}
    results = {n: r.as_dict() for n, r in records.items()}
    # the baseline's level on the training curves' sample, paired with the start's
    baseline = curve_point(problem, problem.W_pca, problem.E_kmeans)
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}   # an array of data: named, not copied
    return {"config": {**copy.deepcopy({**settings, "data": ""}), "data": data_label(cfg.data),
                       "methods": list(cfg.methods)}, "methods": registry,
            "data": problem.data.about if problem.data is not None else None,
            "results": results, "bounds": {**floors, **pop, "curve_baseline": baseline},
            "gradient_check": check_gradients(problem, cfg.methods) if check else {},
            "fd_vs_manual": agreement(results)}


def score(problem, rec):
    """Eval metrics of a trained model, into its record's scores; a model whose
    parameters are finite but whose error overflows is marked diverged."""
    if not rec.ok:                     # a diverged run keeps its last finite parameters, unscored
        return
    with np.errstate(all="ignore"):
        m = eval_metrics(problem, rec.W, rec.E, rec.V, rec.assign)
    if not all(math.isfinite(v) for v in m.values() if v is not None):
        rec.status, rec.diverged_at_step = "diverged", problem.cfg.steps
        rec.note = "parameters finite but their eval error overflows"
        return
    rec.scores.update(m)


def bounds(problem, records):
    """Floors and references: the PCA floor, the Shannon bounds (the rank-m one also at
    each model's measured index entropy), the Zador approximation and the unconstrained
    k-means on the eval set."""
    cfg = problem.cfg
    C, ref_seconds = problem.unconstrained()
    S_eval = problem.X_eval.astype(np.float64, copy=False) @ problem.U  # (n_eval, rank)
    uncon_eval = float(np.mean(nearest(S_eval, C)[1] + problem.eval_sq - np.einsum("nr,nr->n", S_eval, S_eval)))
    source = "data" if has_data(cfg.data) else cfg.family
    gaussian = source == "gaussian"    # the Shannon bounds are floors only for Gaussian data
    for r in records.values():         # the bound at each model's measured index entropy
        if r.ok and gaussian:
            r.scores["entropy_bound"] = rank_m_bound(problem.lam, cfg.m, bits=r.scores["usage_entropy"] / math.log(2))
    out = {"source": source, "gaussian_floors": gaussian,
           "pca_floor": pca_floor(problem.lam, cfg.m), "shannon_bound": shannon_bound(problem.lam, cfg.K),
           "rank_m_bound": rank_m_bound(problem.lam, cfg.m, cfg.K),
           "zador_approximation": zador_approximation(problem.lam, cfg.m, cfg.K),
           "laplace_lower_bound": laplace_lower_bound(problem.lam, cfg.K) if source == "laplace" else None,
           "unconstrained_kmeans": None, "unconstrained_kmeans_se": None,
           "unconstrained_kmeans_eval": uncon_eval, "n_pop": cfg.n_pop,
           "unconstrained_kmeans_seconds": ref_seconds}
    # the tightest floor that holds for this source: what the comparison plot measures from
    candidates = {"PCA floor": out["pca_floor"]}
    if gaussian:
        candidates[f"rank-{cfg.m} Shannon bound"] = out["rank_m_bound"]
    if out["laplace_lower_bound"] is not None:
        candidates["Shannon lower bound (Laplace)"] = out["laplace_lower_bound"]
    out["floor_name"], out["floor"] = max(candidates.items(), key=lambda kv: kv[1])
    return out


def population_scores(problem, records, stream="population"):
    """Every model's error on ``n_pop`` fresh samples (paired) of ``stream``, into its
    record's scores, with its differences to the best model and the baseline; returns the
    unconstrained reference's population error and every pair's paired difference."""
    cfg = problem.cfg
    t0 = time.perf_counter()
    out = {}
    models = {n: (r.W, r.E, r.V, r.assign) for n, r in records.items() if r.ok}
    if cfg.n_pop > 0:
        pop = population_errors({**models, "unconstrained_kmeans": problem.unconstrained()[0]}, problem.U,
                                *problem.samples(derived_rng(cfg.seed, stream), cfg.n_pop, stream),
                                progress=problem.progress)
        mean = dict(zip(pop.names, pop.mean))
        for i, name in enumerate(pop.names):
            if name in records:
                records[name].scores.update(pop_recon_mse=float(pop.mean[i]), pop_recon_se=float(pop.se[i]))
        out["n_pop"] = pop.n                             # with --data: the test rows there are
        j = pop.names.index("unconstrained_kmeans")
        out["unconstrained_kmeans"], out["unconstrained_kmeans_se"] = float(pop.mean[j]), float(pop.se[j])
        # paired differences of every pair of models (a - b and its standard error)
        out["pop_pairs"] = {a: {b: [float(mean[a] - mean[b]), pop.diff_se(a, b)] for b in models if b != a}
                            for a in models}
        if models:
            best = min(models, key=lambda n: mean[n])
            out["best_method"] = best
            for name in models:
                sc = records[name].scores
                sc["pop_diff_to_best"], sc["pop_diff_to_best_se"] = float(mean[name] - mean[best]), pop.diff_se(name, best)
                if "pca_lloyd" in models:
                    sc["pop_diff_to_baseline"] = float(mean[name] - mean["pca_lloyd"])
                    sc["pop_diff_to_baseline_se"] = pop.diff_se(name, "pca_lloyd")
    out["seconds"] = time.perf_counter() - t0
    return out


_METRIC_KEYS = ("recon_mse", "in_sub_dist", "usage_entropy", "dead_frac", "perplexity")


def agreement(results):
    """How closely fd_ste followed manual_ste (same start, batches and optimizer)."""
    a, b = results.get("fd_ste"), results.get("manual_ste")
    if not (a and b and a["status"] == "ok" and b["status"] == "ok"):
        return None
    return {"max_rel_metric_diff": max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300)
                                       for k in _METRIC_KEYS if b[k] != 0 or a[k] != 0),
            "max_abs_W_diff": float(np.max(np.abs(a["W"] - b["W"]))),
            "max_abs_E_diff": float(np.max(np.abs(a["E"] - b["E"])))}


# -------------------------------------------------------- Reporting and plots

def _fmt(x, spec):
    """``format(x, spec)`` without a signed zero: -0.000 prints as 0.000."""
    text = format(x, spec)
    return text.replace("-", "", 1).replace("+", "", 1) if float(text.rstrip("%")) == 0 else text


def _wrap(text, width=100, indent="  "):
    import textwrap
    return textwrap.wrap(text, width, subsequent_indent=indent)


def source_words(summary):
    """What the data are, for titles: '' for the default Gaussian family."""
    c = summary["config"]
    if c.get("data"):
        return f"data {c['data']} ({summary['data']['shape'][0]:,} rows), "
    return f"{c['family']} data, " if c.get("family", "gaussian") != "gaussian" else ""


def format_report(summary):
    """The console report, at most 100 columns: a row per method, a legend for every
    column, the floors (no method can beat them) apart from the references (methods
    may), the gradient checks, and a verdict in words on what the population sample
    separates."""
    res, b, c = summary["results"], summary["bounds"], summary["config"]
    base = res.get("pca_lloyd") if res.get("pca_lloyd", {}).get("pop_recon_mse") is not None else None
    head = (f"{'method':<27}{'eval':>9}{'population ± se':>19}{'vs PCA + Lloyd':>19}"
            f"{'used':>6}{'perp':>7}{'time s':>8}")
    rule = "-" * len(head)
    recipe = (f"recipe shared ({c['optimizer']}, lrE {c['lrE']:g}, lrW {c['lrW']:g})" if c.get("recipe") != "authors"
              else "recipe authors (each method's optimizer and weights: summary.json 'methods')")
    lines = _wrap(f"vq_compare: {source_words(summary)}D={c['D']} rank={c['rank']} m={c['m']} K={c['K']}, "
                  f"{c['steps']} steps, seed {c['seed']}, start {c['start']}, {recipe}; reconstruction error, "
                  "lower is better")
    lines += [rule, head, rule]
    for name, r in res.items():
        label_ = method_label(name)[:26]
        if r["status"] != "ok":
            what = r["status"] + (f" at step {r['diverged_at_step']}" if r["diverged_at_step"] else "")
            lines += _wrap(f"{label_:<27}{what}: {r['note']}", indent=" " * 27)
            continue
        pop = (f"{r['pop_recon_mse']:.5f} ± {r['pop_recon_se']:.4f}" if "pop_recon_mse" in r else "-")
        if base is None or "pop_diff_to_baseline" not in r:
            vs = "-"
        elif name == "pca_lloyd":
            vs = "(baseline)"
        else:
            vs = (f"{_fmt(100 * r['pop_diff_to_baseline'] / base['pop_recon_mse'], '+.3f')} "
                  f"± {200 * r['pop_diff_to_baseline_se'] / base['pop_recon_mse']:.3f}%")
        lines.append(f"{label_:<27}{r['recon_mse']:>9.5f}{pop:>19}{vs:>19}{1 - r['dead_frac']:>6.2f}"
                     f"{r['perplexity']:>7.2f}{r['seconds']:>8.2f}")
    lines.append(rule)
    for name, r in res.items():                             # what a run says of itself
        if r["status"] == "ok" and r.get("note"):
            lines += _wrap(f"{method_label(name)}: {r['note']}")
    lines += _wrap(f"eval: mean ||x - x_hat||^2 on the {c['n_eval']} eval samples; population: on "
                   + (f"the {b['n_pop']:,} held-out test rows" if c.get("data") else
                      f"{b['n_pop']:,} fresh samples of the true distribution") + ", ± its standard error; "
                   "vs PCA + Lloyd: paired difference on those samples, ± 2 paired standard errors "
                   "(about 95%); used: share of the codes used on the eval set; perp: perplexity "
                   "of the code usage; time s: seconds of compute")
    z = b["zador_approximation"]
    zador = ("Zador high-resolution approximation "
             + (f"{z:.5f}" if z is not None else f"none (no lattice tabulated for m={c['m']})"))
    gaussian = b.get("gaussian_floors", True)
    if gaussian:
        lines += _wrap(f"Floors (no method can beat them): PCA floor {b['pca_floor']:.5f}; Shannon "
                       f"bound {b['shannon_bound']:.5f}; rank-{c['m']} Shannon bound {b['rank_m_bound']:.5f}"
                       + "".join(f"; at {method_label(n)}'s index entropy {r['entropy_bound']:.4f}"
                                 for n, r in res.items() if "entropy_bound" in r and n == "pca_lloyd"))
    else:
        lines += _wrap("Floors (no method can beat them): PCA floor "
                       + (f"{b['pca_floor']:.5f} (of the test rows' own second moment)" if c.get("data") else
                          f"{b['pca_floor']:.5f}")
                       + (f"; Shannon lower bound of the Laplace source {b['laplace_lower_bound']:.5f}"
                          if b.get("laplace_lower_bound") is not None else ""))
    uncon = (f"{b['unconstrained_kmeans']:.5f} ± {b['unconstrained_kmeans_se']:.4f} population, "
             if b["unconstrained_kmeans"] is not None else "")
    lines += _wrap(f"References (methods may beat them): k-means in data space (no rank-m "
                   f"restriction) {uncon}{b['unconstrained_kmeans_eval']:.5f} eval"
                   + (f"; {zador}" if gaussian else ""))
    if not gaussian:
        lines += _wrap(f"What a Gaussian of the same second moment would allow (not floors here: for a given "
                       f"covariance the Gaussian is the hardest source, so this data's own bounds lie below): "
                       f"Shannon bound {b['shannon_bound']:.5f}; rank-{c['m']} Shannon bound "
                       f"{b['rank_m_bound']:.5f}; {zador}")
    g = summary["gradient_check"]
    check = ("Gradient check, hand-derived vs finite differences of each method's own loss (largest "
             "difference / largest entry): " + ", ".join(
                 f"{n} {max(g[n]['gW_rel_err'], g[n]['params_rel_err']):.1e}" for n in res if n in g))
    a = summary["fd_vs_manual"]
    if a:
        check += f"; fd_ste vs manual_ste after training: metrics within {a['max_rel_metric_diff']:.1e}"
    lines += _wrap(check)
    lines += _wrap(verdict(summary))
    lines.append(f"Total {summary['total_seconds']:.2f} s")
    return "\n".join(lines)


def holm(pairs, level=0.05):
    """Holm's step-down correction over every unordered pair of ``pairs`` (name -> name ->
    (paired difference, its standard error)): the pairs it separates at family-wise error
    ``level``, from normal two-sided p-values. Returns (every pair, the separated ones).

    >>> pairs = {"a": {"b": (3.0, 1.0), "c": (2.1, 1.0)}, "b": {"c": (0.5, 1.0)}}
    >>> holm(pairs)[1]              # p: 0.0027, 0.036 (> 0.05 / 2), 0.62
    [('a', 'b')]
    """
    items = sorted({tuple(sorted((a, b))) for a in pairs for b in pairs[a]})

    def p_value(a, b):
        d, se = pairs[a][b] if b in pairs.get(a, {}) else pairs[b][a]
        return math.erfc(abs(d) / (se * math.sqrt(2))) if se > 0 else float(d == 0)
    p = [p_value(a, b) for a, b in items]
    separated = []
    for rank, i in enumerate(sorted(range(len(items)), key=p.__getitem__)):
        if p[i] > level / (len(items) - rank):
            break
        separated.append(items[i])
    return items, sorted(separated)


def verdict(summary):
    """In words: which methods the population sample separates from the baseline and
    from the best method, at about 95% (two paired standard errors); differences under
    ``practical`` of the baseline's error are called not practically different; the
    lowest error is named only when it is separable from every other; and how many of
    all the pairs stay separable under Holm's correction."""
    res, pairs = summary["results"], summary["bounds"].get("pop_pairs")
    if not pairs:
        return "Verdict: no population sample (--n_pop 0): nothing is separated."
    practical = summary["config"].get("practical", 0.0)
    out = []
    if "pca_lloyd" in pairs:
        base = res["pca_lloyd"]["pop_recon_mse"]
        groups = {"better": [], "worse": [], "small": [], "tied": []}
        for name in pairs:
            if name == "pca_lloyd":
                continue
            d, se = pairs[name]["pca_lloyd"]
            kind = ("tied" if abs(d) <= 2 * se else "small" if abs(d) < practical * base
                    else "better" if d < 0 else "worse")
            groups[kind].append(f"{method_label(name)} ({_fmt(100 * d / base, '+.3f')}%)")
        out.append(f"Verdict (population, paired, about 95%): better than PCA + Lloyd: "
                   + (", ".join(groups["better"]) or "none") + "; worse: " + (", ".join(groups["worse"]) or "none")
                   + (f"; separable but under {100 * practical:g}% of its error, not practically different: "
                      + ", ".join(groups["small"]) if groups["small"] else "")
                   + "; not separable from it: " + (", ".join(groups["tied"]) or "none") + ".")
    best = summary["bounds"].get("best_method")
    if best and len(pairs) > 1:
        ties = [method_label(n) for n in pairs if n != best and abs(pairs[n][best][0]) <= 2 * pairs[n][best][1]]
        out.append(f"No single lowest error: the lowest, {method_label(best)}, is not separable from "
                   f"{', '.join(ties)}." if ties else f"Lowest error: {method_label(best)}, separable from every other.")
        items, separated = holm(pairs)
        naive = sum(1 for a, b in items if abs(pairs[a][b][0]) > 2 * pairs[a][b][1])
        out.append(f"Of the {len(items)} pairs, {naive} are separable at two standard errors each, "
                   f"{len(separated)} with Holm's correction for all {len(items)} (family-wise 5%).")
    return " ".join(out)


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items() if k not in ("W", "E", "V", "assign", "logs")}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_atomic(path, write):
    """Write a file through ``write(file_object)`` into a temporary beside it, then
    rename it into place: a reader never sees half a file. Created like any file the
    user creates (the umask applies)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    data = json.dumps(_json_ready(obj), indent=2).encode()
    write_atomic(path, lambda fh: fh.write(data))


def write_outputs(summary, outdir):
    """summary.json, <method>_logs.json, comparison.png, training_curves.png; logs of an
    earlier run in the folder that this one did not write are removed (one set)."""
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, "summary.json"), summary)
    written = set()
    for name, r in summary["results"].items():
        if r.get("logs") is not None and name != "pca_lloyd":
            written.add(f"{name}_logs.json")
            write_json(os.path.join(outdir, f"{name}_logs.json"),
                       {"method": name, "status": r["status"], **r["logs"]})
    for stale in set(f for f in os.listdir(outdir) if f.endswith("_logs.json")) - written:
        os.remove(os.path.join(outdir, stale))
    save_figure(plot_comparison(summary), os.path.join(outdir, "comparison.png"))
    save_figure(plot_training_curves(summary), os.path.join(outdir, "training_curves.png"))


def save_figure(fig, path):
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=90))


def _figure(w, h, nrows=1, ncols=1):
    from matplotlib.figure import Figure                   # no pyplot: no display, no global state,
    #                                                        imported only when a plot is drawn
    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


# Twenty colours that stay apart; methods beyond them repeat a colour with another marker.
_PALETTE = ("0.35", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:red", "tab:brown",
            "tab:pink", "tab:olive", "tab:cyan", "navy", "gold", "lime", "teal", "maroon", "darkviolet",
            "sandybrown", "darkslategrey", "deepskyblue", "yellowgreen")


def color(name):
    """Each registered method's own colour, by its place in :data:`METHODS` (a variant:
    its method's)."""
    names, base = list(METHODS), parse_spec(name)[0]
    return _PALETTE[names.index(base) % len(_PALETTE)] if base in names else "k"


def style(name):
    """Colour, marker and line style of a method: methods that overlap stay apart; a
    variant keeps its method's colour with a marker and line of its own."""
    base, own = parse_spec(name)
    i = list(METHODS).index(base) if base in METHODS else 0
    j = i + (zlib.crc32(name.encode()) % 7 + 1 if own else 0)
    return dict(color=color(name), marker="osD^vP*Xhp"[j % 10], ls=("-", "--", "-.", ":")[j % 4],
                label=method_label(name), mfc="none" if own else color(name))


def plot_comparison(summary):
    """Left: how far each method is from the best any rank-m quantizer could do. Right:
    whether it differs from the baseline, with the noise of that difference."""
    res, b, c = summary["results"], summary["bounds"], summary["config"]
    names = [n for n, r in res.items() if r["status"] == "ok" and "pop_recon_mse" in r]
    fig, ax = _figure(12, 2.2 + 0.45 * max(len(names), 3), 1, 2)
    ax0, ax1 = ax[0]
    where = (f"the {b['n_pop']:,} test rows of {c['data']}" if c.get("data") else
             f"{b['n_pop']:,} fresh samples" + (f" ({c['family']})" if c.get("family", "gaussian") != "gaussian"
                                                else ""))
    fig.suptitle(f"Population error on {where}: D={c['D']} rank={c['rank']} m={c['m']} "
                 f"K={c['K']}, {c['steps']} steps, seed {c['seed']}, start {c['start']}", fontsize=10)
    if not names:
        ax0.text(0.5, 0.5, "no population sample (--n_pop 0)", ha="center", transform=ax0.transAxes)
        return fig
    y = np.arange(len(names))[::-1]
    bound, floor_name = b.get("floor", b["rank_m_bound"]), b.get("floor_name", f"rank-{c['m']} Shannon bound")
    gap = np.array([100 * (res[n]["pop_recon_mse"] / bound - 1) for n in names])
    ax0.barh(y, gap, color=[color(n) for n in names], height=0.6)
    for yi, g in zip(y, gap):
        ax0.annotate(f"{g:.1f}%", (g, yi), xytext=(3, -3), textcoords="offset points", fontsize=8)
    if b["unconstrained_kmeans"] is not None:
        ax0.axvline(100 * (b["unconstrained_kmeans"] / bound - 1), color="k", ls="-.", lw=1,
                    label="k-means in data space (reference)")
    if b["zador_approximation"] is not None and b.get("gaussian_floors", True):
        ax0.axvline(100 * (b["zador_approximation"] / bound - 1), color="k", ls=":", lw=1,
                    label="Zador approximation")
    ax0.set_yticks(y, [method_label(n) for n in names])
    ax0.set_xlabel(f"% above the {floor_name} {bound:.4f}\n(a floor: no method goes below 0; lower is better)")
    ax0.set_xlim(0, 1.45 * max(float(gap.max()), *(l.get_xdata()[0] for l in ax0.get_lines())))
    fig.legend(*ax0.get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.4, 0.0), ncol=2,
               fontsize=8, frameon=False)                   # below the axis labels
    ax0.grid(axis="x", alpha=0.3)
    ax0.set_title("How far above a floor no method can beat?", fontsize=10)
    if "pca_lloyd" in names:
        ref = res["pca_lloyd"]["pop_recon_mse"]
        pct = np.array([100 * res[n].get("pop_diff_to_baseline", 0.0) / ref for n in names])
        err = np.array([200 * res[n].get("pop_diff_to_baseline_se", 0.0) / ref for n in names])
        for yi, n, pc, e in zip(y, names, pct, err):
            ax1.errorbar(pc, yi, xerr=e, fmt=style(n)["marker"], color=color(n), capsize=4, ms=6)
            ax1.annotate("baseline" if n == "pca_lloyd" else f"{_fmt(pc, '+.3f')} ± {e:.3f}%", (pc, yi),
                         xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
        span = max(float(np.max(np.abs(pct) + err)), 1e-3)
        ax1.set_xlim(-1.3 * span, 1.3 * span)
        ax1.axvline(0, color="k", lw=0.8)
        ax1.set_yticks(y, [""] * len(names))
        ax1.set_ylim(ax0.get_ylim())                        # each method on one line across both panels
        ax1.set_xlabel("% difference to PCA + Lloyd, paired, ± 2 standard errors\n(lower is better)")
        ax1.set_title("Different from the baseline? (bars crossing 0: not separable)", fontsize=10)
        ax1.grid(axis="x", alpha=0.3)
    h = fig.get_figheight()                                 # margins in inches: any number of rows
    fig.subplots_adjust(left=0.2, right=0.98, bottom=1.2 / h, top=1 - 0.65 / h, wspace=0.05)
    return fig


def plot_training_curves(summary):
    """Along training, every trained method: what the report scores (the paired
    difference to the start on a fixed fresh sample, with its noise), code usage, the
    encoder's angle to the true subspace, re-seeded codes and the batch loss. Methods
    that train by rounds instead of steps (Procrustes-Lloyd) are drawn against the
    rounds, on an axis of their own at the top of the first four panels."""
    res, c = summary["results"], summary["config"]
    names = [n for n, r in res.items() if r.get("logs") and "batch_loss" in r["logs"]]
    by_rounds = [n for n, r in res.items() if r.get("logs") and "batch_loss" not in r["logs"]
                 and len(r["logs"].get("eval", ())) > 1]
    fig, axes = _figure(14, 8.2 if by_rounds else 7.5, 2, 3)
    panels = [("pop_diff_to_start", "error minus the start's, fresh samples (lower is better)"),
              ("codes_used", "share of codes used (eval set)"), ("perplexity", "code perplexity (eval set)"),
              ("subspace_angle_deg", "largest angle to the " + ("test rows' " if c.get("data") else "true ")
               + "top-m subspace (degrees)")]
    fresh = c.get("eval_every", 0) > 0                      # usage on --eval_samples fresh samples instead
    if fresh:
        panels[1:3] = [("codes_used", f"share of codes used ({c['eval_samples']:,} fresh samples)"),
                       ("perplexity", f"code perplexity ({c['eval_samples']:,} fresh samples)")]
    for ax, (key, title) in zip(axes.ravel(), panels):
        top = ax.twiny() if by_rounds and not (fresh and key in ("codes_used", "perplexity")) else None
        for name in names + (by_rounds if top else []):
            where = top if name in by_rounds else ax
            rows = res[name]["logs"]["fresh" if fresh and key in ("codes_used", "perplexity") else "eval"]
            pts = [(e["step"], e[key] if "codes_used" in e or key != "codes_used" else 1 - e["dead_frac"])
                   for e in rows] if key in ("codes_used", "perplexity") else [(e["step"], e.get(key)) for e in rows]
            pts = [(s, v) for s, v in pts if v is not None]
            if not pts:
                continue
            x, v = map(np.array, zip(*pts))
            where.plot(x, v, lw=1.4, ms=4, markevery=max(1, len(x) // 8), **style(name))
            if key == "pop_diff_to_start":
                se = np.array([e["pop_diff_to_start_se"] for e in rows if e.get(key) is not None])
                where.fill_between(x, v - 2 * se, v + 2 * se, color=color(name), alpha=0.15, lw=0)
        if top:
            top.set_xlabel(f"{' and '.join(method_label(n) for n in by_rounds)}: round", fontsize=8,
                           color=color(by_rounds[0]), labelpad=2)
            top.tick_params(axis="x", labelsize=7, colors=color(by_rounds[0]))
            top.set_xlim(-0.5, max(2, *(res[n]["logs"]["eval"][-1]["step"] for n in by_rounds)) + 0.5)
            top.xaxis.get_major_locator().set_params(integer=True)
        if key == "codes_used":
            ax.set_ylim(0, 1.05)
        if key == "perplexity":
            ax.set_ylim(0, 1.05 * c["K"])                   # out of K: eval-set noise stays small
        if key == "pop_diff_to_start":
            ax.axhline(0, color="k", lw=0.8)
            level = summary["bounds"].get("curve_baseline", {}).get("pop_diff_to_start")
            if level is not None and c["start"] != "kmeans":   # from k-means, the start is the baseline
                line = ax.axhline(level, color=color("pca_lloyd"), ls="--", lw=1.2, label="PCA + Lloyd (the baseline)")
                ax.legend(handles=[line], fontsize=8, loc="upper right")
            n_curve = min(N_CURVE, summary["bounds"].get("n_pop", c["n_pop"]))
            where = "test rows" if c.get("data") else "fresh samples"
            title = f"error minus the start's on {n_curve:,} {where}\n(paired, band ± 2 se; lower is better)"
        # y given: no automatic placement of the title, which is slow with twin axes
        ax.set_title(title, fontsize=9, y=1, pad=26 if top else 6)
    ax = axes[1, 1]
    for name in names:
        counts = res[name]["logs"].get("reseeded") or []
        if counts:
            ax.plot(np.arange(1, len(counts) + 1), np.cumsum(counts), lw=1.4, markevery=max(1, len(counts) // 8),
                    ms=4, **style(name))
    if c.get("dead_threshold", 0) == 0:
        ax.text(0.5, 0.5, "no re-seeding\n(--dead_threshold 0)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_title("codes re-seeded so far", fontsize=9)
    ax = axes[1, 2]
    for name in names:
        loss = res[name]["logs"]["batch_loss"]
        if loss:
            ax.plot(np.arange(1, len(loss) + 1), loss, lw=0.8, markevery=max(1, len(loss) // 8), ms=4, **style(name))
    losses = np.concatenate([res[n]["logs"]["batch_loss"] for n in names] + [[1.0]])
    if losses.min() > 0 and losses.max() < 1e100:           # a diverged run: linear axis
        ax.set_yscale("log")
    ax.set_title("training loss on each batch (log scale; EMA's has no codebook term)", fontsize=9)
    for ax in axes.ravel():
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = {}                                             # every method once, rounds included
    for a in fig.axes:
        for h, label in zip(*a.get_legend_handles_labels()):
            if not label.startswith("PCA + Lloyd (the"):
                legend.setdefault(label, h)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=max(1, len(labels)),
               fontsize=8, frameon=False)                  # above the panels: hides no curve
    fig.suptitle(f"Training from the {c['start']} start, the same batches for every method: "
                 f"{source_words(summary)}D={c['D']} "
                 f"rank={c['rank']} m={c['m']} K={c['K']}, seed {c['seed']}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.79 if by_rounds else 0.86,
                        hspace=0.62 if by_rounds else 0.42, wspace=0.22)
    return fig


# --------------------------------------------------------------- Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):                              # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


# The command line writes its results and uses every core unless told otherwise; a
# library call does neither (see Config).
CLI_DEFAULTS = {"outdir": "results_out", "workers": 0}


def whole_number(text):
    """An integer flag's value: ``1000000``, ``1e6`` or ``1_000_000``."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        return int(value)


whole_number.__name__ = "whole number"   # argparse names the type in its message


def add_config_flags(p, skip=(), defaults=True):
    """One flag per :class:`Config` field (its help is the field's), except ``skip``.

    ``defaults=False`` leaves unset flags out of the parsed namespace (a caller fills
    them in).
    """
    for f in dataclasses.fields(Config):
        if f.name in skip or f.name == "method_params":
            continue
        flag, help_ = f"--{f.name}", f.metadata["help"]
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=help_,
                           **({} if defaults else {"default": argparse.SUPPRESS}))
        elif f.name == "methods":
            p.add_argument(flag, nargs="+", default=list(f.default), metavar="NAME",
                           help=f"{help_}; registered: {', '.join(METHODS)}; a variant sets its own, "
                                "e.g. 'affine_ste[nu=0]' or 'manual_ste[lrE=0.4, optimizer=adam]'")
        elif f.name == "fsq_levels":
            p.add_argument(flag, nargs="+", type=whole_number, default=f.default if defaults else argparse.SUPPRESS,
                           metavar="L", help=help_)
        elif f.name == "betas":
            p.add_argument(flag, nargs=2, type=float, default=f.default if defaults else argparse.SUPPRESS,
                           metavar=("B1", "B2"), help=help_)
        else:
            typ = {"int": whole_number, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            default = CLI_DEFAULTS.get(f.name, f.default)
            p.add_argument(flag, type=typ, default=default if defaults else argparse.SUPPRESS,
                           help=help_ if defaults else f"{help_} (default: {default})")
    for name, (default, help_) in declared_params().items():  # the methods' own, from the registry
        method = next(m for m in METHODS if name.startswith(m + "_"))
        p.add_argument(f"--{name}", type=float, default=default if defaults else argparse.SUPPRESS,
                       help=f"{method}: {help_}" + ("" if defaults else f" (default: {default})"))
    return p


def build_parser():
    p = _Parser(prog="vq_compare.py", description=__doc__.split("\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_config_flags(p)


def main(argv=None):
    """CLI entry point: ``python vq_compare.py [--flag value ...]``; returns the exit status
    (2 for a bad flag or setting, one line on stderr, before any work)."""
    parser = build_parser()
    try:
        settings = vars(parser.parse_args(argv))
    except SystemExit as e:                                 # --help, or a flag argparse refused
        return e.code
    settings["methods"] = split_methods(settings["methods"])
    if settings["data"]:                                    # the data's sizes, unless given
        given = {a.dest for a in parser._actions
                 if any(o in (sys.argv[1:] if argv is None else argv) for o in a.option_strings)}
        settings = {k: v for k, v in settings.items() if k in given or k not in DATA_SIZES}
    fresh = bool(settings.get("outdir")) and not os.path.exists(settings["outdir"])
    try:
        cfg = make_config(**settings)                       # every setting checked before any work
    except ConfigError as e:
        sys.stderr.write(f"vq_compare.py: error: {e}\n")
        return 2
    started = time.time()
    try:
        run(cfg)
    except KeyboardInterrupt:
        written = [f for f in (os.listdir(cfg.outdir) if os.path.isdir(cfg.outdir) else [])
                   if os.path.getmtime(os.path.join(cfg.outdir, f)) >= started - 1]
        if fresh and os.path.isdir(cfg.outdir) and not os.listdir(cfg.outdir):
            os.rmdir(cfg.outdir)                            # no empty folder left behind
        sys.stderr.write("vq_compare.py: interrupted: " + (
            f"while writing the outputs: {len(written)} of them written in {cfg.outdir}, the set is "
            "incomplete (run again)\n" if written else
            "nothing saved (the outputs are written together at the end)\n"))
        return 130
    return 0


if __name__ == "__main__" and "__file__" in globals():     # a script, not a pasted notebook cell
    sys.exit(main())
