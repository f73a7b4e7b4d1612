"""vq_compare: exact, fast comparison of ways to train a linear VQ-VAE, in NumPy.

The model: an encoder ``W`` of shape (m, D) with orthonormal rows (a point on the
Stiefel manifold), a codebook ``E`` of shape (K, m) and the transposed decoder::

    Z = X @ W.T          # (n, m) latents
    k = argmin_j ||z - e_j||^2,  Q = E[k]
    X_hat = Q @ W        # (n, D)

trained on synthetic low-rank Gaussian data by

* ``pca_lloyd``        PCA encoder + k-means++ / Lloyd codebook (several restarts);
* ``fd_ste``           straight-through estimator, gradients by central finite
                       differences of the frozen surrogate (our autograd stand-in);
* ``manual_ste``       the same surrogate with hand-derived gradients;
* ``rotation``         the rotation trick (Fifty et al., "Restructuring Vector
                       Quantization with the Rotation Trick", ICLR 2025);
* ``ema_ste``          STE encoder + exponential-moving-average codebook (van den Oord
                       et al., "Neural Discrete Representation Learning", 2017, app. A.1);
* ``procrustes_lloyd`` exact alternating minimisation: Lloyd step for E, orthogonal
                       Procrustes for W; never increases the training error.

Every report also carries the floors no method can beat (PCA floor, Gaussian
Shannon bound), an unconstrained K-means reference and the error on a large fresh
sample of the true distribution with its standard error.

Run ``python vq_compare.py --help``; ``python vq_compare.py`` runs the default
comparison and writes ``results_out/``. Importing this module has no side effects.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Callable, NamedTuple

import numpy as np

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

GRADIENT_METHODS = ("fd_ste", "manual_ste", "rotation", "ema_ste")
ALL_METHODS = ("pca_lloyd",) + GRADIENT_METHODS + ("procrustes_lloyd",)


def _f(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    """Every setting of a comparison; the CLI flags are these field names."""
    D: int = _f(64, "ambient (data) dimension")
    rank: int = _f(6, "rank of the data covariance")
    m: int = _f(4, "latent dimension (rows of the encoder W)")
    K: int = _f(32, "codebook size")
    n_train: int = _f(20000, "training samples")
    n_eval: int = _f(4000, "held-out evaluation samples")
    steps: int = _f(200, "gradient steps of each gradient method (0: the start point only)")
    batch: int = _f(1024, "batch size (sampled with replacement from the training set)")
    alpha: float = _f(1.0, "codebook-loss weight")
    beta: float = _f(0.25, "commitment-loss weight")
    lrW: float = _f(0.08, "encoder learning rate (Riemannian SGD on the Stiefel manifold)")
    lrE: float = _f(0.2, "codebook learning rate (SGD)")
    seed: int = _f(0, "seed of the data, k-means, batches and population sample")
    outdir: str = _f("results_out", "output folder ('' writes nothing)")
    lmax: float = _f(4.0, "largest covariance eigenvalue")
    lmin: float = _f(0.25, "smallest non-zero covariance eigenvalue")
    methods: tuple = _f(ALL_METHODS, "methods to run and report (any of: " + ", ".join(ALL_METHODS) + ")")
    quiet: bool = _f(False, "print nothing")
    ema_decay: float = _f(0.99, "ema_ste: decay of the codebook moving averages")
    ema_eps: float = _f(1e-5, "ema_ste: Laplace smoothing of the cluster sizes")
    dead_threshold: float = _f(0.0, "ema_ste: re-seed a code whose average count per batch falls below this (0 disables)")
    n_pop: int = _f(500_000, "fresh samples of the true distribution for the population error (0 disables)")
    n_init: int = _f(0, "k-means restarts, the lowest inertia kept (0: auto, 8 on small problems, "
                       "fewer as n_train x K grows)")
    kmeans_iter: int = _f(300, "Lloyd iterations per k-means restart at most")
    pl_rounds: int = _f(500, "procrustes_lloyd: rounds at most")
    pl_tol: float = _f(1e-10, "procrustes_lloyd: stop when the relative improvement falls below this")
    log_every: int = _f(0, "evaluate eval-set metrics every this many steps (0: auto, about 20 points)")
    dtype: str = _f("float64", "float64 (exact checks) or float32 (speed)")
    fd_h: float = _f(1e-5, "finite-difference step")
    fd_max_evals: float = _f(2e6, "skip fd_ste when steps x 2 x (parameters) loss evaluations exceed this")
    force_fd: bool = _f(False, "run fd_ste whatever its cost")
    per_method_plots: bool = _f(False, "also write one <method>.png of training curves per gradient method")
    workers: int = _f(0, "processes for the k-means restarts, the unconstrained reference and "
                         "(data under 256 MiB) the methods (0: one per core; 1: all in this "
                         "process); results do not depend on it")


# Derived random streams: one per purpose, so adding a method never changes the
# numbers of another one.
_STREAMS = {"kmeans": 1, "batches": 2, "population": 3, "unconstrained": 4,
            "ema_reseed": 5, "gradcheck": 6}


def derived_rng(seed, purpose):
    """Generator for one purpose (``"kmeans"``, ``"batches"``, ...) derived from ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAMS[purpose],)))


def _as_rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def _lowrank_factor(rng, D, rank, lmax, lmin):
    U, _ = np.linalg.qr(rng.normal(size=(D, rank)))       # (D, rank) orthonormal basis
    lam = np.geomspace(lmax, lmin, rank)                   # (rank,) eigenvalues, descending
    return U, lam


def lowrank_factor(D, rank, seed, lmax=4.0, lmin=0.25):
    """Eigenbasis ``U`` (D, rank) and eigenvalues ``lam`` (rank,) behind :func:`make_lowrank_data`.

    ``Sigma = (U * lam) @ U.T`` exactly as in ``make_lowrank_data`` with the same arguments.
    """
    return _lowrank_factor(np.random.default_rng(seed), D, rank, lmax, lmin)


def make_lowrank_data(D, rank, n_train, n_eval, seed, lmax=4.0, lmin=0.25):
    """Zero-mean Gaussian data with a rank-``rank`` covariance (the original recipe).

    Draws exactly what the original framework drew, in the same order, so the same
    seed gives the same arrays.

    Returns
    -------
    X_train : ndarray of shape (n_train, D)
    X_eval : ndarray of shape (n_eval, D)
    Sigma : ndarray of shape (D, D), eigenvalues ``geomspace(lmax, lmin, rank)`` and zeros

    Examples
    --------
    >>> Xt, Xe, S = make_lowrank_data(D=5, rank=2, n_train=3, n_eval=4, seed=0)
    >>> Xt.shape, Xe.shape, S.shape, int(np.linalg.matrix_rank(S))
    ((3, 5), (4, 5), (5, 5), 2)
    """
    rng = np.random.default_rng(seed)
    U, lam = _lowrank_factor(rng, D, rank, lmax, lmin)
    Sigma = (U * lam) @ U.T                                # (D, D)
    factor = _mvn_factor(Sigma)
    X_train = _mvn_draw(rng, factor, n_train)
    X_eval = _mvn_draw(rng, factor, n_eval)
    return X_train, X_eval, Sigma


_DRAW_ROWS = 8192   # rows per block of _mvn_draw: a multiple of the BLAS row panel (16)


def _mvn_factor(Sigma):
    u, s, _ = np.linalg.svd(Sigma)                         # what multivariate_normal(method='svd') uses
    return u * np.sqrt(s)                                  # (D, D)


def _mvn_draw(rng, factor, n):
    """``rng.multivariate_normal(zeros(D), Sigma, size=n)``, bit for bit, in blocks of rows.

    NumPy draws all n x D standard normals, then multiplies: two n x D arrays at once.
    Drawing and multiplying block by block consumes the same stream and gives the same
    numbers (a test holds it to that) with one n x D array plus a block. Blocks are a
    multiple of 16 rows so the matrix product runs the same kernels on every row. A
    thread writes each block's fresh pages first (first touches cost 0.1-1 s per
    400 MB here) while the block before it is multiplied and this one's normals are
    drawn (on one core).
    """
    D = factor.shape[0]
    out = np.empty((n, D))
    mean = np.zeros(D)
    G = np.empty((min(_DRAW_ROWS, n), D))                 # one buffer: fresh pages cost here

    def touch(a):
        out[a:a + _DRAW_ROWS] = 0.0
    ahead = threading.Thread(target=touch, args=(0,))
    ahead.start()
    for a in range(0, n, _DRAW_ROWS):
        c = min(_DRAW_ROWS, n - a)
        rng.standard_normal(out=G[:c])
        ahead.join()                                       # this block is touched
        if a + _DRAW_ROWS < n:
            ahead = threading.Thread(target=touch, args=(a + _DRAW_ROWS,))
            ahead.start()
        block = np.matmul(G[:c], factor.T, out=out[a:a + c])
        np.add(mean, block, out=block)                     # as mean + ..., signed zeros too
    ahead.join()
    return out


# ----------------------------------------------------------------------------
# Geometry: the Stiefel manifold of matrices with orthonormal rows
# ----------------------------------------------------------------------------

def stiefel_project(W):
    """Polar factor of ``W`` (m, D), m <= D: the nearest matrix with orthonormal rows.

    Examples
    --------
    >>> W = stiefel_project(np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    >>> W
    array([[1., 0., 0.],
           [0., 1., 0.]])
    """
    U, _, Vt = np.linalg.svd(W, full_matrices=False)       # (m, m), (m,), (m, D)
    return U @ Vt                                          # (m, D)


def riemannian_step(W, G, lr):
    """One Riemannian SGD step on the Stiefel manifold (the shared optimizer of W).

    Projects the Euclidean gradient ``G`` (m, D) onto the tangent space at ``W``,
    steps, and retracts with the polar factor.
    """
    sym = G @ W.T                                          # (m, m)
    G_R = G - 0.5 * (sym + sym.T) @ W                      # (m, D) tangent projection
    return stiefel_project(W - lr * G_R)                   # polar retraction


def subspace_angle_deg(W, U_m):
    """Largest principal angle (degrees) between the row space of ``W`` (m, D) and span(U_m).

    ``U_m`` (D, m) has orthonormal columns. The sine form is accurate for small angles.
    """
    Wo = stiefel_project(W)
    resid = Wo - (Wo @ U_m) @ U_m.T                        # (m, D) part outside span(U_m)
    s = np.linalg.norm(resid, 2)
    return float(np.degrees(np.arcsin(min(1.0, s))))


# ----------------------------------------------------------------------------
# Quantizer: assignment, Lloyd, k-means++
# ----------------------------------------------------------------------------

def tall_product(X, W, order="C"):
    """``X @ W.T`` for a tall ``X`` (n, D) and a thin ``W`` (m, D), computed as
    ``(W @ X.T).T``: the same products, which OpenBLAS runs 1.6-1.9x faster for
    (100,000 x 512) @ (512 x 16); equal up to rounding (bit for bit on this machine).
    C-ordered, or with ``order="F"`` Fortran-ordered without the copy (its columns are
    contiguous, as :func:`lloyd_run` wants them).

    >>> X, W = np.arange(6.0).reshape(3, 2), np.array([[1.0, -1.0]])
    >>> tall_product(X, W).ravel()
    array([-1., -1., -1.])
    """
    P = (W @ X.T).T
    return P if order == "F" else np.ascontiguousarray(P)


_CHUNK_ELEMS = 1 << 18   # entries of one (rows x K) distance block: stays in cache


def _rows_per_chunk(width):
    return max(64, _CHUNK_ELEMS // max(1, width))


def _nearest_blocks(Z, Ea, labels, dist, dist2, idx=None):
    """Fill labels (and dist, dist2 unless None), a cache-sized block of rows at a time,
    for the rows of ``Z``, or for its rows ``idx`` (no gathered copy of them all)."""
    (n, m), K = Z.shape, Ea.shape[1]
    n = n if idx is None else len(idx)
    step = _rows_per_chunk(K)
    Za = np.empty((min(step, n), m + 1), dtype=Ea.dtype)
    Za[:, m] = 1
    buf = np.empty((Za.shape[0], K), dtype=Ea.dtype)
    for s in range(0, n, step):
        c = min(step, n - s)
        Za[:c, :m] = Z[s:s + c] if idx is None else Z[idx[s:s + c]]
        d = np.matmul(Za[:c], Ea, out=buf[:c])             # (c, K) = ||e||^2 - 2 z.e
        lab = d.argmin(axis=1)
        labels[s:s + c] = lab
        if dist is None:
            continue
        rows = np.arange(c)
        z_sq = np.einsum("cm,cm->c", Za[:c, :m], Za[:c, :m])
        dist[s:s + c] = d[rows, lab] + z_sq
        if dist2 is not None:
            d[rows, lab] = np.inf                          # argmin is faster than min on short rows
            dist2[s:s + c] = (d[rows, d.argmin(axis=1)] if K > 1 else np.inf) + z_sq


def nearest(Z, E, second=False, with_dist=True):
    """Nearest code of every row of ``Z`` (n, m) in ``E`` (K, m), in bounded memory.

    Returns ``labels`` (n,) and ``dist`` (n,), the squared distance to that code, and
    with ``second=True`` also the squared distance to the second-nearest code
    (``with_dist=False``: the labels alone). Works through cache-sized blocks of rows
    (no n x K matrix); the argmin drops ``||z||^2``, which every code shares.

    From ``4 * _SCREEN_K`` = 256 float64 codes (below, float64 alone is as fast) the
    labels are screened in float32 (the same labels, see :func:`_nearest_bounded`) and
    ``dist`` is ``||z - e||^2`` computed directly for the winning code (without the
    expansion's cancellation).
    """
    if not second and _screens(Z, E, 4 * _SCREEN_K):
        labels = _nearest_bounded(Z, E, _max_sq_norm(Z))[0]
        return (labels, _sq_dist_to(Z, E, labels)) if with_dist else labels
    n = Z.shape[0]
    dtype = np.result_type(Z, E)
    Ea = _augmented(E, dtype)
    labels = np.empty(n, dtype=np.intp)
    dist = np.empty(n, dtype=dtype) if (with_dist or second) else None
    dist2 = np.empty(n, dtype=dtype) if second else None
    _nearest_blocks(Z, Ea, labels, dist, dist2)
    if dist is None:
        return labels
    np.maximum(dist, 0, out=dist)                          # rounding can dip below zero
    if second:
        np.maximum(dist2, 0, out=dist2)
        return labels, dist, dist2
    return labels, dist


def _augmented(E, dtype):
    """``[-2 E^T; ||e||^2]`` (m+1, K) in ``dtype``: ``[z, 1] @ it`` is ``||e||^2 - 2 z.e``."""
    return np.vstack([-2.0 * E.T, np.einsum("km,km->k", E, E)[None]]).astype(dtype)


def _max_sq_norm(Z):
    return float(np.max(np.einsum("nm,nm->n", Z, Z), initial=0.0))


def _sq_dist_to(Z, E, labels):
    """``||z - e_label||^2`` for every row, computed directly, in blocks of rows."""
    dist = np.empty(Z.shape[0], dtype=np.result_type(Z, E))
    step = 1 << 16
    for s in range(0, Z.shape[0], step):
        diff = E[labels[s:s + step]]
        np.subtract(Z[s:s + step], diff, out=diff)
        dist[s:s + step] = np.einsum("nm,nm->n", diff, diff)
    return dist


_SCREEN_K = 64   # codes from which float32 screening pays (measured: 0.5-0.85x the time)


def _screens(Z, E, K_min=_SCREEN_K):
    return Z.dtype == E.dtype == np.float64 and E.shape[0] >= K_min


def _nearest_bounded(Z, E, z_max, idx=None):
    """Labels of the nearest codes, the same as :func:`nearest`'s, with the squared
    distances to the nearest and to the second-nearest code to within the returned
    ``eps`` (enough for bounds); ``z_max`` bounds the rows' squared norms.

    Float64 input is screened in float32 (half the bytes: twice as fast): a row whose
    two nearest float32 distances lie within the rounding bounds of both precisions
    (:func:`_distance_eps`) is computed again in float64, so that each label is the
    float64 argmin; for the others the float32 winner beats every other code by more
    than the float64 rounding, so float64 picks it too. Returns (labels, d1, d2, eps).
    ``idx``: only the rows ``Z[idx]`` (gathered a block at a time when screened).
    Squared norms beyond 1e30 (float32 overflow) or all below 1e-30 (float32's
    subnormals would round coarser than the bound) are not screened.
    """
    scale = z_max + float(np.max(np.einsum("km,km->k", E, E), initial=0.0))
    if not (_screens(Z, E) and 1e-30 < scale < 1e30):
        return (*nearest(Z if idx is None else Z[idx], E, second=True), _distance_eps(E, z_max))
    Ea = _augmented(E, np.float32)
    eps32, eps64 = _distance_eps(E.astype(np.float32), z_max), _distance_eps(E, z_max)
    n = Z.shape[0] if idx is None else len(idx)
    labels = np.empty(n, dtype=np.intp)
    d1, d2 = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    _nearest_blocks(Z, Ea, labels, d1, d2, idx)
    d1, d2 = d1.astype(np.float64), d2.astype(np.float64)
    near = np.flatnonzero(d2 - d1 <= 2 * (eps32 + eps64))
    if near.size:
        labels[near], d1[near], d2[near] = nearest(Z[near if idx is None else idx[near]], E, second=True)
    return labels, np.maximum(d1, 0, out=d1), np.maximum(d2, 0, out=d2), float(eps32)


def assign(Z, E):
    """Index of the nearest code for each row of ``Z``.

    Parameters
    ----------
    Z : ndarray of shape (n, m)
    E : ndarray of shape (K, m)

    Returns
    -------
    labels : ndarray of shape (n,), ties go to the lower index

    Examples
    --------
    >>> assign(np.array([[0.0], [0.9], [2.2]]), np.array([[0.0], [2.0]]))
    array([0, 0, 1])
    """
    return nearest(Z, E, with_dist=False)


def cluster_sums(Z, labels, K, Zt=None):
    """Per-cluster counts (K,) and sums (K, m) of the rows of ``Z``; no n x K temporaries.

    ``Zt``: ``Z.T`` C-ordered, for repeated calls on the same ``Z`` (np.bincount copies
    a strided column first: 8 ms of the 10 per call at 100,000 x 16); the same sums.
    """
    counts = np.bincount(labels, minlength=K)
    cols = Z.T if Zt is None else Zt
    sums = np.empty((K, cols.shape[0]), dtype=np.float64)
    for j in range(cols.shape[0]):                         # m passes of O(n)
        sums[:, j] = np.bincount(labels, weights=cols[j], minlength=K)
    return counts, sums


def row_sums_by_label(X, labels, K):
    """Float64 sums (K, D) of the rows of ``X`` (n, D) with each label: what
    ``np.add.at(S, labels, X)`` gives, bit for bit (rows added in order), 4-5x faster on
    wide rows (a gather and a sum per label instead of n scattered row additions)."""
    order = np.argsort(labels, kind="stable")
    ends = np.searchsorted(labels[order], np.arange(K + 1))
    S = np.zeros((K, X.shape[1]))
    for k in np.flatnonzero(ends[1:] > ends[:-1]):
        S[k] = X[order[ends[k]:ends[k + 1]]].sum(axis=0, dtype=np.float64, initial=0.0)
    return S


def _centroids(Z, labels, dist, E_old, relocate=True):
    """Lloyd update; an empty cluster takes the point farthest from its centre
    (``relocate=False``: it keeps its old centre)."""
    K = E_old.shape[0]
    counts, sums = cluster_sums(Z, labels, K)
    empty = np.flatnonzero(counts == 0)
    if empty.size and relocate:
        n_move = min(empty.size, len(dist))                # more centres than points: not all move
        far = np.argpartition(dist, -n_move)[-n_move:]
        far = far[np.argsort(-dist[far], kind="stable")]
        for j, i in zip(empty, far):
            old = labels[i]
            if counts[old] > 1:                            # never empty another cluster
                counts[old] -= 1
                sums[old] -= Z[i]
                counts[j] = 1
                sums[j] = Z[i]
    E = E_old.astype(np.float64, copy=True)
    has = counts > 0
    E[has] = sums[has] / counts[has, None]
    return E.astype(E_old.dtype, copy=False)


class LloydResult(NamedTuple):
    E: np.ndarray        # (K, m) centres
    labels: np.ndarray   # (n,) nearest centre of each point, for the returned E
    inertia: float       # sum of squared distances to the returned centres
    n_iter: int          # centre updates made
    seconds: float = 0.0  # compute time of the restart (seeding included), see _restart


_SAFE = 1e-9   # relative slack on the accumulated centre drift


def _distance_eps(E, z_max):
    """A bound on the rounding error of a computed squared distance between a point of
    squared norm at most ``z_max`` and a row of ``E``."""
    return 4 * (E.shape[1] + 2) * np.finfo(E.dtype).eps * (
        z_max + float(np.max(np.einsum("km,km->k", E, E))) + 1e-300)


def _safe_gap(d1, d2, eps):
    """A lower bound on ``sqrt(d2) - sqrt(d1)`` for true squared distances that the
    computed ``d1``, ``d2`` approximate to within ``eps`` (absolute)."""
    return np.sqrt(np.maximum(d2 - eps, 0)) - np.sqrt(d1 + eps)


def lloyd_run(Z, E_init, max_iter=300, tol=0.0):
    """Lloyd's algorithm from ``E_init``, with inertia and iteration count.

    Each iteration assigns every point to its nearest centre and moves the centres to
    their cluster means (an empty cluster takes the point farthest from its centre).
    Stops when the assignments stop changing, when the relative inertia decrease falls
    below ``tol`` (``tol=0``: never), or after ``max_iter`` centre updates. Labels
    always match the returned centres.

    Exact, but it skips work that cannot change anything. A point is looked at again
    only when it could have changed (Hamerly's bound): it was ``g`` closer to its own
    centre than to any other, and since then its own centre moved by ``a`` and the
    farthest-moving centre by ``b`` per update; while the sums of ``a + b`` stay below
    ``g`` it keeps its centre (triangle inequality, with the rounding error of the
    distances subtracted from ``g``). From 64 float64 centres the searches are screened
    in float32, with float64's labels (:func:`_nearest_bounded`). The centres are
    recomputed from full sums every iteration, so they are bit for bit those of plain
    Lloyd (:func:`lloyd_plain`), up to exact ties (tested, float64 and float32).
    """
    E = np.array(E_init, dtype=np.result_type(Z, E_init), copy=True)
    n, K = Z.shape[0], E.shape[0]
    z_max = _max_sq_norm(Z)
    Zt = np.ascontiguousarray(Z.T)                         # columns for cluster_sums (a copy
    #                                                        unless Z is Fortran-ordered)
    labels = thresh = None
    own = np.zeros(K)                  # accumulated drift of each centre
    drift, prev_inertia, n_iter = 0.0, np.inf, 0           # drift: of the farthest mover
    for it in range(max_iter + 1):
        # assignment step for the current centres; `moved`: points that changed cluster
        if thresh is not None:                             # only points whose bound expired
            cand = np.flatnonzero(own[labels] + drift > thresh)
            moved = cand[:0]
            if cand.size:
                lab, d1, d2, eps = _nearest_bounded(Z, E, z_max, cand)
                moved = cand[lab != labels[cand]]
                labels[cand] = lab
                thresh[cand] = _safe_gap(d1, d2, eps) + own[lab] + drift
        else:                                              # every point (first, or after a relocation)
            lab, d1, d2, eps = _nearest_bounded(Z, E, z_max)
            moved = None if labels is None else np.flatnonzero(lab != labels)
            labels = lab
            thresh = _safe_gap(d1, d2, eps) + own[labels] + drift
        if it > 0 and moved is not None and moved.size == 0:
            break                                          # assignments stable: E are their means
        if tol > 0:
            inertia = float(np.sum((Z - E[labels]) ** 2))
            if prev_inertia - inertia < tol * prev_inertia:
                break
            prev_inertia = inertia
        if it == max_iter:
            break
        # update step
        counts, sums = cluster_sums(Z, labels, K, Zt)
        if (counts == 0).any():                            # empty clusters: relocation
            dist = np.sum((Z - E[labels]) ** 2, axis=1)
            E_new = _centroids(Z, labels, dist, E)
            thresh = None                                  # a point moved without a bound
        else:                                              # what _centroids computes
            E_new = (sums / counts[:, None]).astype(E.dtype, copy=False)
        n_iter += 1
        step = np.sqrt(np.sum((E_new.astype(np.float64) - E) ** 2, axis=1))   # (K,) moves
        own += step * (1 + _SAFE)
        drift += float(np.max(step)) * (1 + _SAFE)
        E = E_new
    labels, dist = nearest(Z, E)
    return LloydResult(E, labels, float(dist.sum()), n_iter)


def lloyd_plain(Z, E_init, max_iter=300):
    """Textbook Lloyd (a full assignment every iteration): the reference for tests."""
    E = np.array(E_init, dtype=np.result_type(Z, E_init), copy=True)
    prev = None
    n_iter = 0
    for _ in range(max_iter):
        labels, dist = nearest(Z, E)
        if prev is not None and np.array_equal(labels, prev):
            break
        E = _centroids(Z, labels, dist, E)
        prev, n_iter = labels, n_iter + 1
    labels, dist = nearest(Z, E)
    return LloydResult(E, labels, float(dist.sum()), n_iter)


def lloyd(Z, E_init, max_iter, tol=0.0):
    """Lloyd's algorithm (k-means) from the given centres.

    Parameters
    ----------
    Z : ndarray of shape (n, m)
    E_init : ndarray of shape (K, m)
    max_iter : int, centre updates at most
    tol : float, stop when the relative inertia decrease is below ``tol``; with 0 it
        stops only when the assignments stop changing or at ``max_iter``.

    Returns
    -------
    E : ndarray of shape (K, m)
    labels : ndarray of shape (n,), nearest centre of each point for the returned E

    Examples
    --------
    >>> Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> E, labels = lloyd(Z, np.array([[1.0, 0.0], [9.0, 0.0]]), max_iter=10)
    >>> E, labels
    (array([[ 0. ,  0.5],
           [10. ,  0.5]]), array([0, 0, 1, 1]))
    """
    r = lloyd_run(Z, E_init, max_iter, tol)
    return r.E, r.labels


def kmeans_plusplus(Z, K, rng):
    """Greedy k-means++ seeding (2 + ln K candidates per centre). Returns (K, m)."""
    n = Z.shape[0]
    trials = 2 + int(np.log(K))
    z_sq = np.einsum("nm,nm->n", Z, Z)
    centres = np.empty((K, Z.shape[1]), dtype=Z.dtype)
    first = rng.integers(n)
    centres[0] = Z[first]
    closest = np.maximum(z_sq - 2 * Z @ Z[first] + z_sq[first], 0)   # (n,)
    for c in range(1, K):
        total = closest.sum()
        if total > 0:
            cand = np.searchsorted(np.cumsum(closest), rng.uniform(size=trials) * total)
            cand = np.minimum(cand, n - 1)
        else:                                              # fewer distinct points than K
            cand = rng.integers(n, size=trials)
        Zc = Z[cand]                                       # (t, m)
        d = (-2 * Zc) @ Z.T                                # (t, n); bits of -2 (Zc @ Z.T)
        d += z_sq
        d += z_sq[cand][:, None]
        np.maximum(d, 0, out=d)
        np.minimum(d, closest, out=d)                      # potential if candidate is added
        best = int(np.argmin(d.sum(axis=1)))
        centres[c] = Zc[best]
        closest = d[best]
    return centres


def _restart(Z, K, rng, max_iter, tol, init=None):
    """One k-means restart: k-means++ seeding from ``rng`` (or the centres ``init``),
    then Lloyd; its ``seconds`` are measured where it runs."""
    t0 = time.perf_counter()
    r = lloyd_run(Z, kmeans_plusplus(Z, K, rng) if init is None else init, max_iter, tol)
    return r._replace(seconds=time.perf_counter() - t0)


def _restart_tasks(Z, K, seed, n_init, max_iter, tol=0.0):
    """Arguments of :func:`_restart` for ``n_init`` restarts: restart i draws from the
    i-th generator spawned from ``seed``, wherever it runs."""
    return [(Z, K, r, max_iter, tol) for r in _as_rng(seed).spawn(max(1, n_init))]


def _best(runs):
    """The restart with the lowest inertia (the first of equals)."""
    return min(runs, key=lambda r: r.inertia)


def kmeans_run(Z, K, seed=0, n_init=8, max_iter=300, tol=0.0, workers=1):
    """k-means: ``n_init`` k-means++ starts, Lloyd from each, the lowest inertia kept.

    Restart i draws from the i-th generator spawned from ``seed``, so the result is the
    same whether the restarts run here or on ``workers`` processes.
    """
    n = Z.shape[0]
    if not 1 <= K <= n:
        raise ValueError(f"n_samples={n} should be >= K={K} >= 1")
    return _best(run_tasks(_restart, _restart_tasks(Z, K, seed, n_init, max_iter, tol), workers))


def kmeans(Z, K, seed=0, n_init=8, max_iter=300, tol=0.0, workers=1):
    """k-means++ seeding, ``n_init`` restarts keeping the best, Lloyd to convergence.

    Parameters
    ----------
    Z : ndarray of shape (n, m)
    K : int, number of centres, 1 <= K <= n
    seed : int or numpy.random.Generator
    n_init, max_iter, tol : restarts, Lloyd iterations per restart, see :func:`lloyd`
    workers : processes to spread the restarts over (the result does not change)

    Returns
    -------
    E : ndarray of shape (K, m)
    labels : ndarray of shape (n,)

    Examples
    --------
    >>> Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> E, labels = kmeans(Z, 2, seed=0)
    >>> E[np.argsort(E[:, 0])]
    array([[ 0. ,  0.5],
           [10. ,  0.5]])
    """
    r = kmeans_run(Z, K, seed, n_init, max_iter, tol, workers)
    return r.E, r.labels


# ----------------------------------------------------------------------------
# Worker processes (results never depend on them)
# ----------------------------------------------------------------------------

_BLAS = {}


def _blas_thread_setter():
    """OpenBLAS's ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 and newer: sets
    the BLAS threads of the calling thread only) from the library NumPy loaded, or
    None (another BLAS, an older OpenBLAS, not Linux)."""
    if "set" not in _BLAS:
        _BLAS["set"] = None
        try:
            import ctypes
            with open("/proc/self/maps") as fh:
                paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower()
                                and ln.split()[-1].startswith("/")})
            for path in paths:
                fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _BLAS["set"] = fn
                    break
        except OSError:
            pass
    return _BLAS["set"]


def run_threads(fn, arg_list, threads):
    """``[fn(*args) for args in arg_list]`` on ``threads`` threads of this process, each
    with one BLAS thread, when the BLAS lets a thread set that for itself; else in turn.

    For work on data too big to send to worker processes: the threads share it. NumPy
    releases the GIL in BLAS calls and array loops, and results do not depend on the
    thread count (tested). Two threads with two BLAS threads each would slow each other
    down several times over, hence the sequential fallback.
    """
    if threads == 0:
        threads = os.cpu_count() or 1
    if os.environ.get("VQ_COMPARE_WORKER"):               # a worker process: the cores are taken
        threads = 1
    setter = _blas_thread_setter() if threads > 1 and len(arg_list) > 1 else None
    if setter is None:
        return [fn(*args) for args in arg_list]
    from concurrent.futures import ThreadPoolExecutor

    def call(args):
        setter(1)
        return fn(*args)
    with ThreadPoolExecutor(min(threads, len(arg_list))) as ex:
        return list(ex.map(call, arg_list))


_POOL = {"pool": None, "size": 0}
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "VQ_COMPARE_WORKER": "1"}


def _noop():
    return None


def _spawn_safe():
    """Can a fresh interpreter import the functions it is sent? Only if they live in an
    importable module: not when this code was pasted into a notebook or a script."""
    return __name__ != "__main__"


def worker_pool(workers):
    """A pool of ``workers`` fresh interpreters with one BLAS thread each, or None when
    the work should stay in this process: ``workers <= 1``, inside a worker already, or
    when a fresh interpreter could not import this code (pasted into a notebook)."""
    if workers == 0:
        workers = os.cpu_count() or 1
    if workers <= 1 or os.environ.get("VQ_COMPARE_WORKER") or not _spawn_safe():
        return None
    if _POOL["size"] != workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        if _POOL["pool"] is not None:
            _POOL["pool"].shutdown()
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)                     # read by the children as they start
        # Children import this module by name; hide the main script so that they do not
        # run it again (a script without an `if __name__ == "__main__"` guard would).
        main = sys.modules["__main__"]
        main_file = main.__dict__.pop("__file__", None)
        spec, main.__spec__ = getattr(main, "__spec__", None), None
        try:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(workers):                       # start them all now
                pool.submit(_noop)
        finally:
            if main_file is not None:
                main.__file__ = main_file
            main.__spec__ = spec
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if not _POOL.get("atexit"):
            import atexit
            atexit.register(_shutdown_pool)                # before the interpreter tears down
        _POOL.update(pool=pool, size=workers, atexit=True)
    return _POOL["pool"]


_BIG_DATA = 1 << 28   # bytes of data above which make_problem lets its workers go


def _data_bytes(cfg):
    return (cfg.n_train + cfg.n_eval) * cfg.D * np.dtype(cfg.dtype).itemsize


def _shutdown_pool(wait=True):
    if _POOL["pool"] is not None:
        _POOL["pool"].shutdown(wait=wait)
        _POOL.update(pool=None, size=0)


class _InFile(NamedTuple):
    path: str            # an array argument, saved as .npy for the workers to map


_FILE_BYTES = 1 << 20   # array arguments larger than this reach workers through a file


def _scratch_dir(nbytes):
    """/dev/shm (memory) when it has room for ``nbytes`` twice over, else the usual
    temporary directory (containers often give /dev/shm only 64 MB)."""
    try:
        if shutil.disk_usage("/dev/shm").free > 2 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _call_mapped(fn, args):
    return fn(*[np.load(a.path, mmap_mode="r") if isinstance(a, _InFile) else a for a in args])


def run_tasks(fn, arg_list, workers, then=None):
    """``[fn(*args) for args in arg_list]``, spread over worker processes when
    :func:`worker_pool` gives a pool and there are at least two tasks.
    ``then=(k, more)``: once the first ``k`` tasks are done, ``more(their results)``
    gives the arguments of further tasks of the same batch, whose results follow (the
    other tasks keep running meanwhile). An array
    argument over 1 MiB is written once to a temporary file that the workers map
    read-only (a pickle would hold two more copies of it in memory, here and there);
    callers send the data matrix itself only when it is small. This process
    waits meanwhile: its BLAS threads and busy workers on the same cores would slow
    each other down several times over (measured: training 2.9x slower next to one
    busy worker)."""
    pool = worker_pool(workers) if len(arg_list) >= 2 else None
    if pool is not None:
        big = {id(a): a.nbytes for args in arg_list for a in args
               if isinstance(a, np.ndarray) and a.nbytes > _FILE_BYTES}
        tmp = tempfile.mkdtemp(prefix="vq_compare_", dir=_scratch_dir(sum(big.values())))
        files = {}

        def send(a):
            if not (isinstance(a, np.ndarray) and a.nbytes > _FILE_BYTES):
                return a
            if id(a) not in files:
                files[id(a)] = _InFile(os.path.join(tmp, f"{len(files)}.npy"))
                np.save(files[id(a)].path, a)
            return files[id(a)]
        try:
            futures = [pool.submit(_call_mapped, fn, [send(a) for a in args]) for args in arg_list]
            if then is not None:
                k, more = then
                futures += [pool.submit(_call_mapped, fn, [send(a) for a in args])
                            for args in more([f.result() for f in futures[:k]])]
            return [f.result() for f in futures]
        except Exception:                                  # lost workers: redo the work here
            _shutdown_pool(wait=False)                     # (an error of fn itself recurs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = [_call_mapped(fn, args) for args in arg_list]
    if then is not None:
        out += [_call_mapped(fn, args) for args in then[1](out[:then[0]])]
    return out


@contextlib.contextmanager
def _spilled(enabled, nbytes):
    """``put(a)`` in the block saves the array ``a`` to a temporary file and gives the
    :class:`_InFile` that :func:`run_tasks` hands to its workers (or maps here), so that
    this process need not keep ``a`` beside big data while they work; with ``enabled``
    false it gives ``a`` back. ``nbytes``: about how much will be put. The files go
    when the block ends."""
    if not enabled:
        yield lambda a: a
        return
    tmp = tempfile.mkdtemp(prefix="vq_compare_", dir=_scratch_dir(nbytes))
    saved = []

    def put(a):
        saved.append(_InFile(os.path.join(tmp, f"{len(saved)}.npy")))
        np.save(saved[-1].path, a)
        return saved[-1]
    try:
        yield put
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Losses, the frozen surrogate and hand-derived gradients
# ----------------------------------------------------------------------------

class LossTerms(NamedTuple):
    recon: float        # mean ||x - q W||^2
    codebook: float     # alpha * mean ||sg(z) - e_k||^2
    commitment: float   # beta * mean ||z - sg(e_k)||^2
    total: float


class Grads(NamedTuple):
    loss: float          # surrogate (= true) loss at (W, E)
    gW: np.ndarray       # (m, D) Euclidean gradient
    gE: np.ndarray       # (K, m)


def loss_terms(W, E, X, alpha, beta):
    """The VQ-VAE loss on a batch ``X`` (B, D), straight from its definition."""
    B = X.shape[0]
    Z = X @ W.T                                            # (B, m)
    Q = E[assign(Z, E)]                                    # (B, m)
    recon = float(np.sum((X - Q @ W) ** 2)) / B
    vq = float(np.sum((Z - Q) ** 2)) / B
    return LossTerms(recon, alpha * vq, beta * vq, recon + (alpha + beta) * vq)


class Frozen(NamedTuple):
    """Everything the surrogate treats as a constant (stop-gradient), for one batch.

    The estimator's output is ``q~ = lam * R z + C`` with
    ``R v = v - 2 r (r.v) + 2 q_hat (z_hat.v)``. For STE ``lam = 1``, ``r = q_hat =
    z_hat = 0`` (R = I) and ``C = q - z``; for the rotation trick ``lam = ||q||/||z||``
    and ``C = 0``, except on degenerate samples, which fall back to STE.
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


_DEGENERATE = 1e-8   # ||z_hat + q_hat|| below this: rotation undefined, STE fallback


def freeze(W, E, X, estimator="ste"):
    """Build the frozen quantities of the surrogate at (W, E) for batch ``X`` (B, D).

    Rotation trick (Fifty et al. 2025, eq. 4): ``q~ = sg(lam R) z`` with
    ``lam = ||q||/||z||`` and ``R = I - 2 r r^T + 2 q_hat z_hat^T``, so ``lam R z = q``.
    Where ``z = 0``, ``q = 0`` or ``q_hat = -z_hat`` (to within 1e-8) the rotation is
    undefined and that sample uses STE.
    """
    if estimator not in ("ste", "rotation"):
        raise ValueError(f"estimator={estimator!r} should be 'ste' or 'rotation'")
    Z = X @ W.T                                            # (B, m)
    labels = assign(Z, E)
    Q = E[labels]                                          # (B, m)
    B, m = Z.shape
    zeros = np.zeros_like(Z)
    if estimator == "ste":
        return Frozen(labels, Z, Q, np.ones(B, Z.dtype), zeros, zeros, zeros, Q - Z, B)
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
                  np.where(fb, 0, z_hat), np.where(fb, Q - Z, 0), int((~ok).sum()))


def rotation_matrices(fr):
    """Per-sample ``lam R`` of shape (B, m, m); the identity for STE samples."""
    B, m = fr.Z0.shape
    R = np.eye(m, dtype=fr.Z0.dtype) - 2 * fr.r[:, :, None] * fr.r[:, None, :] \
        + 2 * fr.q_hat[:, :, None] * fr.z_hat[:, None, :]          # (B, m, m)
    return fr.lam[:, None, None] * R


def surrogate_loss(W, E, X, fr, alpha, beta):
    """The frozen surrogate, evaluated from its definition; W and E may be stacks.

    ``L = mean ||x - q~ W||^2 + alpha mean ||sg(z) - e_k||^2 + beta mean ||z - sg(e_k)||^2``
    with ``q~ = lam R z + C`` from :class:`Frozen`. At the point where ``fr`` was built
    its value is the true loss.

    Parameters
    ----------
    W : ndarray of shape (m, D) or (P, m, D); E : ndarray of shape (K, m) or (P, K, m)
    X : ndarray of shape (B, D); fr : Frozen; alpha, beta : float

    Returns
    -------
    float, or ndarray of shape (P,) when W or E is a stack
    """
    B, D = X.shape
    Ws = W.reshape((-1,) + W.shape[-2:])                   # (P, m, D)
    P, m, _ = Ws.shape
    Z = (X @ Ws.reshape(P * m, D).T).reshape(B, P, m)      # (B, P, m): one GEMM for all P
    if fr.n_fallback == B and not fr.r.any():              # pure STE: lam R = I
        A = Z + fr.C[:, None, :]                           # (B, P, m) q~
    else:
        A = Z @ np.swapaxes(rotation_matrices(fr), 1, 2) + fr.C[:, None, :]
    # ||x - a W||^2 = ||x||^2 - 2 (x W^T).a + a (W W^T) a^T, summed over the batch
    AtA = np.transpose(A, (1, 2, 0)) @ np.transpose(A, (1, 0, 2))     # (P, m, m)
    WWt = Ws @ np.swapaxes(Ws, 1, 2)                       # (P, m, m)
    recon = (np.sum(X * X) - 2 * np.einsum("bpm,bpm->p", Z, A)
             + np.sum(AtA * WWt, axis=(1, 2))) / B         # (P,)
    commit = np.sum((Z - fr.Q0[:, None, :]) ** 2, axis=(0, 2)) / B
    codebook = np.sum((fr.Z0 - E[..., fr.labels, :]) ** 2, axis=(-2, -1)) / B
    out = np.reshape(recon + beta * commit, W.shape[:-2]) + alpha * codebook
    return float(out) if np.ndim(out) == 0 else out


def manual_grads(W, E, X, alpha, beta, estimator="ste", frozen=None):
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
    ``dX_t W^T = -2/B (Z - Q G)`` and ``Q^T dX_t = -2/B (Q^T X - Q^T Q W)``, so the step
    costs two (B, D) x (D, m)-sized products.

    Parameters
    ----------
    W : ndarray of shape (m, D); E : ndarray of shape (K, m); X : ndarray of shape (B, D)
    alpha, beta : float; estimator : "ste" or "rotation"
    frozen : the :func:`freeze` of (W, E, X, estimator) when the caller has it already

    Returns
    -------
    Grads(loss, gW (m, D), gE (K, m)), a named tuple, in the dtype of the inputs.
    """
    fr = freeze(W, E, X, estimator) if frozen is None else frozen
    B = X.shape[0]
    Z, Q = fr.Z0, fr.Q0                                    # (B, m), forward q~ = Q
    G = W @ W.T                                            # (m, m)
    QG = Q @ G                                             # (B, m)
    dZQ = Z - Q                                            # (B, m)
    dot = functools.partial(np.einsum, "ij,ij->")         # not BLAS: a threaded dot would
    recon = float(dot(X, X)) - 2 * float(dot(Z, Q)) + float(dot(QG, Q))   # round by thread count
    loss = (recon + (alpha + beta) * float(dot(dZQ, dZQ))) / B
    dQt = (-2.0 / B) * (Z - QG)                            # (B, m) gradient reaching q~
    if estimator == "ste":
        dZ = dQt                                           # straight through
    else:                                                  # lam R^T g, R^T g = g - 2r(r.g) + 2 z_hat(q_hat.g)
        rg = np.sum(fr.r * dQt, axis=1, keepdims=True)
        qg = np.sum(fr.q_hat * dQt, axis=1, keepdims=True)
        dZ = fr.lam[:, None] * (dQt - 2 * fr.r * rg + 2 * fr.z_hat * qg)
    dZ = dZ + (2.0 * beta / B) * dZQ
    # decoder + encoder paths: Q^T dX_t + dZ^T X = (dZ - 2/B Q)^T X + 2/B Q^T Q W
    gW = (dZ - (2.0 / B) * Q).T @ X + ((2.0 / B) * (Q.T @ Q)) @ W      # (m, D)
    counts, sums = cluster_sums(Z, fr.labels, E.shape[0])
    gE = ((2.0 * alpha / B) * (counts[:, None] * E - sums)).astype(E.dtype, copy=False)
    return Grads(float(loss), gW, gE)


# ----------------------------------------------------------------------------
# Finite differences: the autograd stand-in (evaluates the loss only)
# ----------------------------------------------------------------------------

class _SteStats(NamedTuple):
    B: int
    trxx: float          # tr(X^T X)
    Sxx: np.ndarray      # (D, D) X^T X
    Sxc: np.ndarray      # (D, m) X^T C
    Scc: np.ndarray      # (m, m) C^T C
    Sxq: np.ndarray      # (D, m) X^T Q0
    qq: float            # ||Q0||^2
    counts: np.ndarray   # (K,)
    sums: np.ndarray     # (K, m) per-code sums of Z0
    ssq: float           # ||Z0||^2
    E: np.ndarray        # (K, m) the codebook at the freeze point


def _ste_stats(X, fr, E):
    counts, sums = cluster_sums(fr.Z0, fr.labels, E.shape[0])
    Sxx = X.T @ X
    return _SteStats(X.shape[0], float(np.trace(Sxx)), Sxx, X.T @ fr.C, fr.C.T @ fr.C,
                     X.T @ fr.Q0, float(np.sum(fr.Q0 ** 2)), counts, sums,
                     float(np.sum(fr.Z0 ** 2)), E)


def _ste_surrogate_from_stats(W, E, st, alpha, beta):
    """The STE surrogate through the batch's sufficient statistics (same value as
    :func:`surrogate_loss`). With ``A = X W^T + C``::

        sum ||x - a W||^2 = tr(Sxx) - 2 tr(W Sxx W^T) - 2 tr(W Sxc) + tr(A^T A W W^T)
        A^T A = W Sxx W^T + W Sxc + Sxc^T W^T + Scc
    """
    Wt = np.swapaxes(W, -1, -2)
    WSWt = (W @ st.Sxx) @ Wt                               # (..., m, m)
    WSxc = W @ st.Sxc                                      # (..., m, m)
    AtA = WSWt + WSxc + np.swapaxes(WSxc, -1, -2) + st.Scc
    WWt = W @ Wt
    tr_WSWt = np.trace(WSWt, axis1=-2, axis2=-1)
    recon = st.trxx - 2 * tr_WSWt - 2 * np.trace(WSxc, axis1=-2, axis2=-1) \
        + np.sum(AtA * WWt, axis=(-2, -1))
    commit = tr_WSWt - 2 * np.einsum("...md,dm->...", W, st.Sxq) + st.qq
    codebook = st.ssq - 2 * np.sum(E * st.sums, axis=(-2, -1)) \
        + np.einsum("k,...km->...", st.counts, E * E)
    return (recon + alpha * codebook + beta * commit) / st.B


def _ste_surrogate_W_entries(W, st, alpha, beta, idx, delta):
    """The STE surrogate at ``W + delta * e_(a,b)`` for every flat index ``idx`` (a, b).

    The same loss as :func:`_ste_surrogate_from_stats`, with E unchanged, but the
    (m, m) statistics of each perturbed W are formed from those of W: with
    ``w = W[:, b]``, ``s = (W Sxx)[:, b]`` and ``u = e_a``,
    ``W'Sxx W'^T = W Sxx W^T + delta (u s^T + s u^T) + delta^2 Sxx[b, b] u u^T``,
    ``W'Sxc = W Sxc + delta u Sxc[b]``, ``W'W'^T = W W^T + delta (u w^T + w u^T) + delta^2 u u^T``.
    Returns shape (len(idx),).
    """
    m, D = W.shape
    a, b = np.divmod(np.asarray(idx), D)
    WS = W @ st.Sxx                                        # (m, D)
    M, N, G = WS @ W.T, W @ st.Sxc, W @ W.T                # (m, m) each
    u = np.eye(m)[a]                                       # (p, m)
    s, w = WS[:, b].T, W[:, b].T                           # (p, m)
    uu = u[:, :, None] * u[:, None, :]                     # (p, m, m)
    us = u[:, :, None] * s[:, None, :]
    uw = u[:, :, None] * w[:, None, :]
    M2 = M + delta * (us + np.swapaxes(us, 1, 2)) + delta ** 2 * st.Sxx[b, b][:, None, None] * uu
    N2 = N + delta * u[:, :, None] * st.Sxc[b][:, None, :]
    G2 = G + delta * (uw + np.swapaxes(uw, 1, 2)) + delta ** 2 * uu
    AtA = M2 + N2 + np.swapaxes(N2, 1, 2) + st.Scc
    tr_M2 = np.trace(M2, axis1=1, axis2=2)
    recon = st.trxx - 2 * tr_M2 - 2 * np.trace(N2, axis1=1, axis2=2) + np.sum(AtA * G2, axis=(1, 2))
    tr_WSxq = np.sum(W.T * st.Sxq) + delta * st.Sxq[b, a]
    commit = tr_M2 - 2 * tr_WSxq + st.qq
    codebook = st.ssq - 2 * np.sum(st.E * st.sums) + np.sum(st.counts * np.sum(st.E * st.E, axis=1))
    return (recon + alpha * codebook + beta * commit) / st.B


def fd_grads(W, E, X, alpha, beta, estimator="ste", h=1e-5, coords=None, fast=True):
    """Central finite differences of the frozen surrogate over entries of W and E.

    The stand-in for autograd: assignments (and the STE offset or the rotation) are
    frozen at (W, E), then each entry is perturbed by +-h and the loss re-evaluated.
    It never calls the hand-derived gradient code, and always works in float64 (the
    gradients come back in the dtype of W and E). For STE the loss is evaluated through
    the batch's sufficient statistics (``fast=True``; a perturbed W's statistics are
    formed from W's by rank-one updates, see :func:`_ste_surrogate_W_entries`),
    otherwise directly from the definition, the perturbations in vectorised blocks.

    Parameters
    ----------
    W : (m, D); E : (K, m); X : (B, D); estimator : "ste" or "rotation"; h : step
    coords : None for every entry, or (w_idx, e_idx), flat indices into W and E; the
        other entries of the returned gradients are NaN.

    Returns
    -------
    Grads(loss, gW (m, D), gE (K, m))
    """
    out_dtype = np.result_type(W, E)
    W, E, X = (np.asarray(a, dtype=np.float64) for a in (W, E, X))   # differences need float64
    fr = freeze(W, E, X, estimator)
    fast = fast and estimator == "ste"
    if fast:
        st = _ste_stats(X, fr, E)
        def f(Ws, Es):
            return _ste_surrogate_from_stats(Ws, Es, st, alpha, beta)
        block = max(1, (1 << 22) // (W.size * W.shape[1] + 1))
    else:
        def f(Ws, Es):
            return surrogate_loss(Ws, Es, X, fr, alpha, beta)
        block = max(1, (1 << 20) // (X.shape[0] * W.shape[0] + 1))
    w_idx, e_idx = (np.arange(W.size), np.arange(E.size)) if coords is None else coords
    loss = float(f(W, E))

    def central(P, idx, other_is_W):
        g = np.full(P.size, np.nan)
        for s in range(0, len(idx), block):
            ii = np.asarray(idx[s:s + block])
            stack = np.repeat(P.reshape(1, -1), 2 * len(ii), axis=0)
            rows = np.arange(len(ii))
            stack[rows, ii] += h
            stack[rows + len(ii), ii] -= h
            stack = stack.reshape((-1,) + P.shape)
            vals = f(W, stack) if other_is_W else f(stack, E)
            g[ii] = (vals[:len(ii)] - vals[len(ii):]) / (2 * h)
        return g.reshape(P.shape)

    if fast:                                               # every W entry from W's own statistics
        w_idx = np.asarray(w_idx)
        gW = np.full(W.size, np.nan)
        gW[w_idx] = (_ste_surrogate_W_entries(W, st, alpha, beta, w_idx, h)
                     - _ste_surrogate_W_entries(W, st, alpha, beta, w_idx, -h)) / (2 * h)
        gW = gW.reshape(W.shape)
    else:
        gW = central(W, w_idx, other_is_W=False)
    gE = central(E, e_idx, other_is_W=True)
    return Grads(loss, gW.astype(out_dtype, copy=False), gE.astype(out_dtype, copy=False))


def rel_err(a, b):
    """Largest entry-wise difference relative to the largest entry: max|a-b| / max|b|.

    NaN entries of ``a`` (coordinates not computed) are ignored.
    """
    mask = ~np.isnan(a)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    return float(np.max(np.abs(a[mask] - b[mask]), initial=0.0)) / scale


def gradient_check(W, E, X, alpha, beta, estimator="ste", h=1e-5, n_coords=None, rng=None):
    """Compare :func:`manual_grads` with :func:`fd_grads`; returns relative errors.

    ``n_coords``: check only this many random entries of W and of E (for large models).
    """
    man = manual_grads(W, E, X, alpha, beta, estimator)
    coords = None
    if n_coords is not None and (W.size > n_coords or E.size > n_coords):
        rng = _as_rng(rng)
        coords = (rng.choice(W.size, min(n_coords, W.size), replace=False),
                  rng.choice(E.size, min(n_coords, E.size), replace=False))
    fd = fd_grads(W, E, X, alpha, beta, estimator, h, coords)
    return {"gW_rel_err": rel_err(fd.gW, man.gW), "gE_rel_err": rel_err(fd.gE, man.gE),
            "loss_rel_err": abs(fd.loss - man.loss) / abs(man.loss),
            "coords": "all" if coords is None else int(len(coords[0]) + len(coords[1]))}


# ----------------------------------------------------------------------------
# Metrics and floors
# ----------------------------------------------------------------------------

def usage_stats(labels, K):
    """``usage_entropy`` (nats), ``perplexity`` and ``dead_frac`` of a labelling."""
    counts = np.bincount(labels, minlength=K)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-np.sum(p * np.log(p)))
    return {"usage_entropy": entropy, "perplexity": math.exp(entropy),
            "dead_frac": float(np.mean(counts == 0))}


def metrics(W, E, X, x_sq=None):
    """Reconstruction and code-usage metrics of the model (W, E) on ``X`` (n, D).

    Returns a dict: ``recon_mse`` = mean ||x - q W||^2, ``in_sub_dist`` = mean
    ||z - q||^2, ``usage_entropy`` (nats), ``perplexity`` = exp(entropy), ``dead_frac``.

    ``x_sq``, the sum of ||x||^2 over ``X``, asserts that W has orthonormal rows: the
    error then comes from ||x - qW||^2 = ||x||^2 - ||z||^2 + ||z - q||^2 (no (n, D)
    reconstruction; the training logs use it, equal to 1e-12 relative, tested).

    Examples
    --------
    >>> W = np.array([[1.0, 0.0]])            # keep the first coordinate
    >>> E = np.array([[-1.0], [1.0]])
    >>> X = np.array([[-1.0, 1.0], [2.0, 0.0]])
    >>> {k: round(v, 4) for k, v in metrics(W, E, X).items()}
    {'recon_mse': 1.0, 'in_sub_dist': 0.5, 'usage_entropy': 0.6931, 'perplexity': 2.0, 'dead_frac': 0.0}
    """
    n, D = X.shape
    Z = tall_product(X, W)                                 # (n, m)
    labels, dist = nearest(Z, E)
    in_sub = float(dist.sum())
    if x_sq is None:
        recon, step = 0.0, _rows_per_chunk(D)
        for s in range(0, n, step):                        # (c, D) blocks
            recon += float(np.sum((X[s:s + step] - E[labels[s:s + step]] @ W) ** 2))
    else:
        recon = x_sq - float(np.einsum("nm,nm->", Z, Z)) + in_sub
    return {"recon_mse": recon / n, "in_sub_dist": in_sub / n, **usage_stats(labels, E.shape[0])}


def pca_floor(lam, m):
    """Error of the best m-dimensional subspace: the sum of eigenvalues beyond the m-th.

    >>> pca_floor([4.0, 2.0, 1.0], 1)
    3.0
    """
    lam = np.sort(np.asarray(lam, dtype=float))[::-1]
    return float(lam[m:].sum())


def shannon_bound(lam, K):
    """Gaussian distortion-rate bound at log2(K) bits (reverse water-filling).

    No K-point quantizer of N(0, diag(lam)) has a smaller mean squared error:
    ``D = sum_i min(theta, lam_i)`` with ``sum_i max(0, log2(lam_i/theta)/2) = log2 K``.

    >>> shannon_bound([1.0], 2)                 # one component: lam / K^2
    0.25
    >>> round(shannon_bound([4.0, 1.0], 4), 6)  # both components active: theta = 0.5
    1.0
    """
    lam = np.asarray(lam, dtype=float)
    lam = lam[lam > 0]
    rate = math.log2(K)
    if rate == 0 or lam.size == 0:
        return float(lam.sum())

    def bits(theta):
        return float(np.sum(np.maximum(0.0, 0.5 * np.log2(lam / theta))))

    lo, hi = float(lam.max()) * 2.0 ** (-2 * rate), float(lam.max())   # bits(lo) >= rate >= bits(hi)
    for _ in range(200):                                   # bisection in log space
        mid = math.sqrt(lo * hi)
        if bits(mid) > rate:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    active = lam[lam > hi]
    if active.size == 0:
        active = lam[lam >= lo]
    # closed form on the active set: sum log2(lam_i / theta) = 2 log2 K
    theta = 2.0 ** ((np.sum(np.log2(active)) - 2 * rate) / active.size)
    return float(np.sum(np.minimum(theta, lam)))


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


def _population_chunk(S, prepared):
    """Errors (c, models) of the models on the samples ``S`` (c, rank)."""
    s_sq = np.einsum("cr,cr->c", S, S)
    errs = np.empty((S.shape[0], len(prepared)))
    for j, (V, E, corr) in enumerate(prepared):
        if V is None:
            errs[:, j] = nearest(S, E)[1]
        else:
            Z = S @ V.T                                    # (c, m)
            lab, dist = nearest(Z, E)
            # ||x - qW||^2 = ||s||^2 - ||z||^2 + ||z - q||^2 + ||qW||^2 - ||q||^2
            errs[:, j] = s_sq - np.einsum("cm,cm->c", Z, Z) + dist + corr[lab]
    return errs


def _prepare_model(mdl):
    """A model of :func:`population_errors` in the form :func:`_population_chunk` scores."""
    if isinstance(mdl, tuple):
        W, E = (np.asarray(a, dtype=np.float64) for a in mdl)
        qW = np.einsum("km,km->k", E @ W, E @ W)           # ||e W||^2 per code
        return W, E, qW - np.einsum("km,km->k", E, E)      # W @ U is taken later
    return None, np.asarray(mdl, dtype=np.float64), None


def population_errors(models, U, lam, n_pop, rng, chunk=1 << 16, threads=1, columns=None):
    """Reconstruction error of each model on ``n_pop`` fresh samples of N(0, U diag(lam) U^T).

    Works in the rank-``rank`` coordinates ``s`` (x = s U^T), chunk by chunk, so neither
    time nor memory grows with D. Every model sees the same samples, so differences
    between models are paired. ``threads``: chunks scored at once, by
    :func:`run_threads`; the samples and the result do not depend on it.

    Parameters
    ----------
    models : dict name -> (W, E) for a VQ model, or name -> C (K, rank), a codebook in
        the coordinates of U (the unconstrained reference).
    U : ndarray of shape (D, rank); lam : ndarray of shape (rank,)
    rng : the samples' generator (not advanced: a copy draws them)
    columns : dict name -> (n_pop,) per-sample errors already computed by
        :func:`population_columns` from the same generator (an earlier, partial batch);
        the result is the same as without them.
    """
    names = list(models)
    cols = {n: c for n, c in (columns or {}).items() if n in models}
    todo = [n for n in names if n not in cols]
    if todo:
        cols.update(population_columns({n: models[n] for n in todo}, U, lam, n_pop, rng, chunk, threads))
    total, cross = np.zeros(len(names)), np.zeros((len(names), len(names)))
    for a in range(0, n_pop, chunk):                       # sums in chunks, in order
        block = np.stack([cols[n][a:a + chunk] for n in names], axis=1)   # (c, models)
        total += block.sum(axis=0)
        cross += block.T @ block
    mean = total / n_pop
    cov = (cross - n_pop * np.outer(mean, mean)) / max(n_pop - 1, 1)
    return Population(names, mean, np.sqrt(np.maximum(np.diag(cov), 0) / n_pop), cov, n_pop)


def population_columns(models, U, lam, n_pop, rng, chunk=1 << 16, threads=1):
    """The per-sample errors behind :func:`population_errors`: dict name -> (n_pop,).

    Draws the samples from a copy of ``rng``, in chunks of ``chunk``, so every call
    with the same generator state sees the same samples: models can be scored in
    several batches (the CLI scores the models that finished while others train).
    """
    rng = copy.deepcopy(rng)
    names = list(models)
    prepared = []
    for name in names:
        W, E, corr = _prepare_model(models[name])
        prepared.append((None if W is None else W @ U, E, corr))   # V (m, rank): z = s V^T
    sd = np.sqrt(lam)
    out = np.empty((n_pop, len(names)))
    done = 0
    wave = max(1, threads if threads > 0 else os.cpu_count() or 1)
    while done < n_pop:
        samples, starts = [], []                           # drawn in order, scored at once
        while done < n_pop and len(samples) < wave:
            c = min(chunk, n_pop - done)
            samples.append((rng.standard_normal((c, len(lam))) * sd, prepared))   # (c, rank)
            starts.append(done)
            done += c
        for a, errs in zip(starts, run_threads(_population_chunk, samples, threads)):
            out[a:a + errs.shape[0]] = errs
    return {name: out[:, j] for j, name in enumerate(names)}


# ----------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    """What every method sees: the settings, the data and the shared start point."""
    cfg: Config
    X_train: np.ndarray      # (n_train, D)
    X_eval: np.ndarray       # (n_eval, D)
    U: np.ndarray            # (D, rank) true eigenbasis
    lam: np.ndarray          # (rank,) true eigenvalues
    W0: np.ndarray           # (m, D) PCA encoder
    E0: np.ndarray           # (K, m) k-means codebook on the PCA latents
    start_seconds: float     # time to build (W0, E0)
    reference: tuple = None  # unconstrained_reference(problem)
    eval_sq: float = None    # sum of ||x||^2 over X_eval (float64 data), for the logs

    def start(self):
        """What :func:`make_problem` computes beyond the data (small arrays only)."""
        return self.W0, self.E0, self.start_seconds, unconstrained_reference(self)


def _result(W, E, logs=None, status="ok", step=None, note=""):
    return {"W": W, "E": E, "logs": logs, "status": status, "diverged_at_step": step, "note": note}


DIVERGED = 1e4   # a run whose eval error grows past this multiple of its start has diverged


def _eval_sq(problem):
    """Sum of ||x||^2 over X_eval, once per problem; None for float32 data (the logs'
    shortcut would lose digits there)."""
    if problem.eval_sq is None and problem.X_eval.dtype == np.float64:
        problem.eval_sq = float(np.einsum("nd,nd->", problem.X_eval, problem.X_eval))
    return problem.eval_sq


def _eval_row(problem, step, W, E):
    row = {"step": step, **metrics(W, E, problem.X_eval, _eval_sq(problem))}
    if problem.cfg.m <= problem.cfg.rank:
        row["subspace_angle_deg"] = subspace_angle_deg(W, problem.U[:, :problem.cfg.m])
    return row


def _train(problem, step_fn):
    """Shared training loop: the same batches for every method, eval metrics logged.

    ``step_fn(W, E, Xb) -> (loss, W_new, E_new)``. A non-finite loss or parameter, or
    an eval error above ``DIVERGED`` times the start's, stops the run, which is then
    reported as diverged at that step.
    """
    cfg, X = problem.cfg, problem.X_train
    W, E = problem.W0.copy(), problem.E0.copy()
    rng = derived_rng(cfg.seed, "batches")
    logs = {"batch_loss": [], "eval": [_eval_row(problem, 0, W, E)]}
    with np.errstate(all="ignore"):                        # overflow is detected, not warned about
        for t in range(1, cfg.steps + 1):
            Xb = X[rng.integers(0, X.shape[0], size=cfg.batch)]          # (B, D)
            try:
                loss, W_new, E_new = step_fn(W, E, Xb)
            except np.linalg.LinAlgError:
                loss = math.nan
            if not (math.isfinite(loss) and np.isfinite(W_new).all() and np.isfinite(E_new).all()):
                return _result(W, E, logs, "diverged", t, f"non-finite loss or parameters at step {t}")
            W, E = W_new, E_new
            logs["batch_loss"].append(float(loss))
            if t % cfg.log_every == 0 or t == cfg.steps:
                row = _eval_row(problem, t, W, E)
                if not row["recon_mse"] <= DIVERGED * logs["eval"][0]["recon_mse"]:
                    return _result(W, E, logs, "diverged", t,
                                   f"eval error {row['recon_mse']:.3g} at step {t}, over {DIVERGED:g}x its start")
                logs["eval"].append(row)
    return _result(W, E, logs)


def _sgd(problem, grad_fn):
    """The optimizer shared by every gradient method: Riemannian SGD on W, SGD on E."""
    cfg = problem.cfg

    def step(W, E, Xb):
        loss, gW, gE = grad_fn(W, E, Xb)
        if not (math.isfinite(loss) and np.isfinite(gW).all() and np.isfinite(gE).all()):
            return math.nan, W, E
        return loss, riemannian_step(W, gW, cfg.lrW), E - cfg.lrE * gE
    return _train(problem, step)


def method_pca_lloyd(problem):
    """PCA encoder + k-means codebook: the shared start of every other method."""
    return _result(problem.W0.copy(), problem.E0.copy())


def method_fd_ste(problem):
    """STE trained with finite-difference gradients (the autograd stand-in)."""
    c = problem.cfg
    return _sgd(problem, lambda W, E, Xb: fd_grads(W, E, Xb, c.alpha, c.beta, "ste", c.fd_h))


def method_manual_ste(problem):
    """STE trained with hand-derived gradients."""
    c = problem.cfg
    return _sgd(problem, lambda W, E, Xb: manual_grads(W, E, Xb, c.alpha, c.beta, "ste"))


def method_rotation(problem):
    """The rotation trick (Fifty et al. 2025) with hand-derived gradients."""
    c = problem.cfg
    return _sgd(problem, lambda W, E, Xb: manual_grads(W, E, Xb, c.alpha, c.beta, "rotation"))


@dataclasses.dataclass
class EmaState:
    """Moving averages of an EMA codebook (hidden, i.e. before debiasing)."""
    counts: np.ndarray   # (K,) EMA of per-batch cluster sizes
    sums: np.ndarray     # (K, m) EMA of per-batch cluster sums
    t: int = 0           # updates made (for debiasing)

    @classmethod
    def zeros(cls, K, m):
        return cls(np.zeros(K), np.zeros((K, m)))


def ema_codebook_update(E, state, Z, labels, decay, eps=1e-5, dead_threshold=0.0, rng=None):
    """One EMA codebook update (van den Oord et al. 2017, appendix A.1; zero-debiased).

    ``N_j <- decay N_j + (1-decay) n_j``, ``M_j <- decay M_j + (1-decay) sum_{i in j} z_i``,
    both divided by ``1 - decay^t``; the counts are Laplace-smoothed,
    ``N_j' = (N_j + eps) / (sum N + K eps) * sum N``, and ``e_j = M_j / N_j'``. A code
    that has never been used keeps its vector (instead of collapsing to the origin).
    With ``dead_threshold > 0`` a code whose debiased count falls below it is re-seeded
    from a random latent of ``Z`` (its averages reset so that ``e_j`` is that latent).

    Returns the new codebook (K, m) and the number of re-seeded codes; ``state`` is
    updated in place.
    """
    K = E.shape[0]
    n_j, s_j = cluster_sums(Z, labels, K)
    state.counts = decay * state.counts + (1 - decay) * n_j
    state.sums = decay * state.sums + (1 - decay) * s_j
    state.t += 1
    debias = 1 - decay ** state.t
    N, M = state.counts / debias, state.sums / debias
    total = N.sum()
    smoothed = (N + eps) / (total + K * eps) * total
    E_new = np.array(E, dtype=np.float64)
    used = N > 0
    E_new[used] = M[used] / smoothed[used, None]
    reseeded = 0
    if dead_threshold > 0:
        dead = np.flatnonzero(N < dead_threshold)
        if dead.size:
            pick = _as_rng(rng).integers(0, Z.shape[0], size=dead.size)
            E_new[dead] = Z[pick]
            # reset: debiased count = threshold, debiased sum = smoothed count * latent
            N[dead] = dead_threshold
            total = N.sum()
            smoothed = (N + eps) / (total + K * eps) * total
            state.counts[dead] = dead_threshold * debias
            state.sums[dead] = smoothed[dead, None] * Z[pick] * debias
            reseeded = int(dead.size)
    return E_new.astype(E.dtype, copy=False), reseeded


def method_ema_ste(problem):
    """STE encoder (reconstruction + commitment) with an EMA codebook."""
    c = problem.cfg
    state = EmaState.zeros(*problem.E0.shape)
    rng = derived_rng(c.seed, "ema_reseed")
    reseeded = [0]

    def step(W, E, Xb):
        fr = freeze(W, E, Xb, "ste")                       # latents and codes at the pre-step point
        loss, gW, _ = manual_grads(W, E, Xb, 0.0, c.beta, "ste", frozen=fr)
        if not (math.isfinite(loss) and np.isfinite(gW).all()):
            return math.nan, W, E
        E_new, r = ema_codebook_update(E, state, fr.Z0, fr.labels, c.ema_decay, c.ema_eps,
                                       c.dead_threshold, rng)
        reseeded[0] += r
        return loss, riemannian_step(W, gW, c.lrW), E_new
    res = _train(problem, step)
    if c.dead_threshold > 0:
        res["note"] = (res["note"] + f" {reseeded[0]} codes re-seeded").strip()
    return res


def procrustes_lloyd(X, W, E, max_rounds=500, tol=1e-10):
    """Exact alternating minimisation of the training reconstruction error.

    Each round: W <- polar factor of ``Q^T X`` (orthogonal Procrustes, assignments and
    E fixed), then E <- centroids of the latents, then reassignment. No step increases
    ``mean ||x - q W||^2``. Stops when the relative improvement of a round is below
    ``tol`` or after ``max_rounds``.

    One pass over X per round: with ``S`` the per-cluster sums of the rows of X (K, D),
    ``Q^T X = E^T S`` and the centroids of ``Z = X W^T`` are ``S W^T / counts``; ``S``
    follows the points that change cluster. The reassignment looks again only at points
    that might change code: a lower bound on each point's distance to the other codes
    falls each round by how far the point and the farthest code moved (Hamerly's bound,
    as in :func:`lloyd_run`); the same trajectory as full passes (tested).

    Returns W (m, D), E (K, m) and the training error before round 1 and after each round.
    """
    n, K = X.shape[0], E.shape[0]
    row_sq = np.einsum("nd,nd->n", X, X)                   # no (n, D) temporary
    x_sq, z_max = float(row_sq.sum()), float(row_sq.max(initial=0.0))   # ||z|| <= ||x||: rows of W orthonormal
    Z = tall_product(X, W)                                 # (n, m)
    labels, dist, low = _pl_bounds(Z, E, z_max)
    counts = np.bincount(labels, minlength=K)
    S = row_sums_by_label(X, labels, K)                    # float64 sums of x per cluster

    def train_err(Z, dist):        # orthonormal rows: ||x - qW||^2 = ||x||^2 - ||z||^2 + ||z - q||^2
        return (x_sq - float(np.sum(Z * Z)) + float(dist.sum())) / n
    history = [train_err(Z, dist)]
    for _ in range(max_rounds):
        W = stiefel_project(E.astype(np.float64).T @ S).astype(X.dtype)   # (m, D) Procrustes
        Z_old, Z = Z, tall_product(X, W, "F")
        has = counts > 0                                   # an empty cluster keeps its code
        E_old, E = E, E.astype(np.float64)                 # (moving points would break descent)
        E[has] = (S[has] @ W.T.astype(np.float64)) / counts[has, None]
        E = E.astype(X.dtype)
        # reassignment: a point keeps its code while the distance to it stays below the
        # lower bound on the others, which falls by how far the point and the codes moved
        dE = np.subtract(E, E_old, dtype=np.float64)
        de = float(np.sqrt(np.max(np.einsum("km,km->k", dE, dE))))
        dZ = np.subtract(Z, Z_old, dtype=np.float64)       # (few (n, m) temporaries: the
        del Z_old                                          # threads of big data share memory)
        low -= (np.sqrt(np.einsum("nm,nm->n", dZ, dZ)) + de) * (1 + _SAFE)
        del dZ
        diff = E[labels]
        np.subtract(Z, diff, out=diff)
        dist = np.einsum("nm,nm->n", diff, diff).astype(np.float64)   # to the own code
        del diff
        cand = np.flatnonzero(np.sqrt(dist + _distance_eps(E, z_max)) >= low)
        new = labels.copy()
        if cand.size:
            new[cand], dist[cand], low[cand] = _pl_bounds(Z[cand], E, z_max)
        moved = cand[new[cand] != labels[cand]]
        if moved.size:
            Xm = X[moved]
            np.subtract.at(S, labels[moved], Xm)
            np.add.at(S, new[moved], Xm)
            counts = np.bincount(new, minlength=K)
            labels = new
        history.append(train_err(Z, dist))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return W, E, history


def _pl_bounds(Z, E, z_max):
    """Labels, squared distance to the nearest code and a lower bound on the distance
    (not squared) to every other code, for the rows of ``Z``."""
    labels, d1, d2, eps = _nearest_bounded(Z, E, z_max)
    if _screens(Z, E):                                     # d1 good to float32 only: again,
        d1 = _sq_dist_to(Z, E, labels)                     # directly, in float64
    return labels, d1.astype(np.float64), np.sqrt(np.maximum(d2 - eps, 0))


def method_procrustes_lloyd(problem):
    """Alternating Lloyd / orthogonal-Procrustes steps from the PCA + k-means start."""
    c = problem.cfg
    W, E, hist = procrustes_lloyd(problem.X_train, problem.W0, problem.E0, c.pl_rounds, c.pl_tol)
    logs = {"train_recon_mse": hist, "eval": [_eval_row(problem, len(hist) - 1, W, E)]}
    return _result(W, E, logs)


# One table of methods, one signature: method(problem) -> result dict.
METHODS: dict[str, Callable[[Problem], dict]] = {
    "pca_lloyd": method_pca_lloyd,
    "fd_ste": method_fd_ste,
    "manual_ste": method_manual_ste,
    "rotation": method_rotation,
    "ema_ste": method_ema_ste,
    "procrustes_lloyd": method_procrustes_lloyd,
}
assert tuple(METHODS) == ALL_METHODS


# ----------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------

class ConfigError(ValueError):
    """An invalid setting; ``flag`` and ``value`` name it."""
    def __init__(self, flag, value, reason):
        super().__init__(f"--{flag} {value}: {reason}")
        self.flag, self.value = flag, value


def _check_outdir(outdir):
    """Raise ConfigError unless ``outdir`` exists as a folder or could be created."""
    path = os.path.abspath(outdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError("outdir", outdir, "exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError("outdir", outdir, "is not writable")
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError("outdir", outdir, f"cannot be created ({parent} is not a writable folder)")


def validate(cfg):
    """Raise :class:`ConfigError` for the first invalid setting of ``cfg``."""
    def need(ok, flag, reason):
        if not ok:
            raise ConfigError(flag, getattr(cfg, flag), reason)
    for flag in ("D", "rank", "m", "K", "n_train", "n_eval", "batch", "kmeans_iter"):
        v = getattr(cfg, flag)
        need(isinstance(v, (int, np.integer)) and v >= 1, flag, "must be a whole number >= 1")
    for flag in ("steps", "seed", "n_pop", "pl_rounds", "n_init", "log_every"):
        v = getattr(cfg, flag)
        need(isinstance(v, (int, np.integer)) and v >= 0, flag, "must be a whole number >= 0")
    need(cfg.rank <= cfg.D, "rank", f"must be <= D={cfg.D}")
    need(cfg.m <= cfg.D, "m", f"must be <= D={cfg.D}")
    need(cfg.K <= cfg.n_train, "K", f"must be <= n_train={cfg.n_train}")
    for flag in ("lrW", "lrE", "fd_h", "lmax", "lmin"):
        v = getattr(cfg, flag)
        need(math.isfinite(v) and v > 0, flag, "must be positive and finite")
    for flag in ("alpha", "beta", "ema_eps", "dead_threshold", "pl_tol", "fd_max_evals"):
        v = getattr(cfg, flag)
        need(math.isfinite(v) and v >= 0, flag, "must be finite and >= 0")
    need(cfg.lmin <= cfg.lmax, "lmin", f"must be <= lmax={cfg.lmax}")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(cfg.dtype in ("float64", "float32"), "dtype", "must be float64 or float32")
    methods = (cfg.methods,) if isinstance(cfg.methods, str) else tuple(cfg.methods)
    need(len(methods) > 0, "methods", "name at least one method")
    for name in methods:
        if name not in METHODS:
            raise ConfigError("methods", name, "unknown method (known: " + ", ".join(METHODS) + ")")
    if cfg.outdir:
        _check_outdir(cfg.outdir)


def make_problem(cfg, start=None, reference=True):
    """Data, true spectrum, the shared PCA + k-means start point and the unconstrained
    reference.

    ``start``: the :meth:`Problem.start` of a problem with the same data settings, to
    reuse its start point and reference instead of computing them again.
    ``reference=False`` leaves the reference to :func:`compare`, which computes it in
    the same batch as the methods (the same result; worker processes stay busy).
    """
    dtype = np.dtype(cfg.dtype)
    X_train, X_eval, _ = make_lowrank_data(cfg.D, cfg.rank, cfg.n_train, cfg.n_eval,
                                           cfg.seed, cfg.lmax, cfg.lmin)
    U, lam = lowrank_factor(cfg.D, cfg.rank, cfg.seed, cfg.lmax, cfg.lmin)
    X_train, X_eval = X_train.astype(dtype, copy=False), X_eval.astype(dtype, copy=False)
    if start is not None:
        W0, E0, start_seconds, reference = start
        return Problem(cfg, X_train, X_eval, U, lam, W0, E0, start_seconds, reference)
    t0 = time.perf_counter()
    W0 = pca_encoder(X_train, cfg.m)
    pca_seconds = time.perf_counter() - t0
    # The restarts of the start point and of the reference do not depend on each other:
    # one batch, so that worker processes stay busy; the reference's start from the
    # lifted baseline codebook joins it as soon as the baseline's restarts are done.
    n_init = _restarts(cfg)
    big = _data_bytes(cfg) > _BIG_DATA                     # the workers' inputs in files only
    with _spilled(big and worker_pool(cfg.workers) is not None, cfg.n_train * (cfg.m + cfg.rank) * 8) as put:
        tasks = _restart_tasks(put(tall_product(X_train, W0, "F")), cfg.K, derived_rng(cfg.seed, "kmeans"),
                               n_init, cfg.kmeans_iter)   # kmeans_run's, as kmeans() would run them
        then = None
        if reference:
            S_train = put(_rank_coords(X_train, U))
            tasks += _reference_tasks(cfg, S_train)
            then = (n_init, lambda base: [_lifted_task(cfg, W0, _best(base).E, U, S_train)])
        runs = run_tasks(_restart, tasks, cfg.workers, then)
    if big:
        _shutdown_pool()                                   # idle workers' memory next to big data
    problem = Problem(cfg, X_train, X_eval, U, lam, W0, _best(runs[:n_init]).E,
                      pca_seconds + sum(r.seconds for r in runs[:n_init]))
    if reference:
        _set_reference(problem, runs[n_init:])
    return problem


def pca_encoder(X, m):
    """Top-m eigenvectors of the second-moment matrix ``X^T X / n`` as rows (m, D).

    The model has no bias, so the uncentred second moment is the right matrix (the
    data are zero-mean). Each row's sign makes its largest entry positive.
    """
    C = (X.T @ X) / X.shape[0]                             # (D, D)
    _, vecs = np.linalg.eigh(C)
    W = vecs[:, ::-1][:, :m].T                             # (m, D) descending eigenvalues
    sign = np.sign(W[np.arange(m), np.argmax(np.abs(W), axis=1)])
    return np.ascontiguousarray(W * sign[:, None])


def _fd_skip_reason(cfg):
    evals = cfg.steps * 2 * (cfg.m * cfg.D + cfg.K * cfg.m)
    if evals > cfg.fd_max_evals and not cfg.force_fd:
        return (f"skipped: {evals:.3g} loss evaluations (steps x 2 x {cfg.m * cfg.D + cfg.K * cfg.m}"
                f" parameters) exceed --fd_max_evals {cfg.fd_max_evals:g}; --force_fd runs it")
    return None


def _gradient_checks(problem):
    """manual_grads against fd_grads at the start point on the first training batch."""
    c = problem.cfg
    W, E = problem.W0.astype(np.float64), problem.E0.astype(np.float64)   # small copies
    Xb = problem.X_train[derived_rng(c.seed, "batches").integers(0, c.n_train, size=c.batch)]
    Xb = Xb.astype(np.float64, copy=False)
    n_params = W.size + E.size
    n_coords = None if n_params <= 2048 else 256
    out = {"point": "pca_lloyd start, first training batch", "h": c.fd_h,
           "measure": "max|fd - manual| / max|manual| per tensor"}
    for est in ("ste", "rotation"):
        out[est] = gradient_check(W, E, Xb, c.alpha, c.beta, est, c.fd_h, n_coords,
                                  derived_rng(c.seed, "gradcheck"))
    return out


_METRIC_KEYS = ("recon_mse", "in_sub_dist", "usage_entropy", "dead_frac", "perplexity")


def run_comparison(**settings):
    """Run the comparison; the notebook entry point (``main()`` wraps it).

    Takes the CLI settings as keyword arguments with the flags' names (see
    :class:`Config`; ``outdir=None`` writes nothing). Returns a dict shaped like
    ``summary.json`` in which each method's entry also holds its trained ``W`` (m, D)
    and ``E`` (K, m) and its ``logs``.
    """
    return _run(make_config(**settings))


def _run(cfg, after_start=None):
    """run_comparison's body; ``after_start()`` is called once the start point exists."""
    t_start = time.perf_counter()
    problem = make_problem(cfg, reference=_data_bytes(cfg) > _BIG_DATA)   # else: with the methods
    if after_start is not None:
        after_start()
    summary = compare(problem)
    summary["total_seconds"] = time.perf_counter() - t_start
    if cfg.outdir:
        write_outputs(summary, cfg.outdir)
    if not cfg.quiet:
        print(format_report(summary))
        if cfg.outdir:
            print(f"\nWrote {cfg.outdir}/summary.json, comparison.png, training_curves.png and logs")
    return summary


def make_config(**settings):
    """A validated :class:`Config` from keyword settings (raises :class:`ConfigError`)."""
    cfg = Config(**settings)
    cfg.methods = (cfg.methods,) if isinstance(cfg.methods, str) else tuple(cfg.methods)
    validate(cfg)
    cfg.n_init = _restarts(cfg)
    if cfg.log_every == 0:
        cfg.log_every = max(1, cfg.steps // 20)
    return cfg


def _restarts(cfg):
    return cfg.n_init or auto_restarts(cfg.n_train, cfg.K)


def auto_restarts(n, K, budget=1 << 22):
    """k-means restarts for ``--n_init 0``: 8 while one Lloyd pass (n x K distances)
    stays below ``budget``, then fewer in proportion, at least 1.

    >>> auto_restarts(20000, 32), auto_restarts(100000, 512)
    (8, 1)
    """
    return int(min(8, max(1, round(8 * budget / (n * K)))))


def compare(problem):
    """Run ``problem.cfg.methods`` on a problem and score them; returns the summary dict.

    Settings that do not change the data or the start point (``steps``, ``beta``, the
    learning rates, ``methods``, ...) may be changed in ``problem.cfg`` between calls:
    the start point and the unconstrained reference are computed once per problem.
    """
    cfg = problem.cfg
    results, checks, early = _run_methods(problem)
    return {"config": {**dataclasses.asdict(cfg), "methods": list(cfg.methods)},
            "results": results, "bounds": _bounds(problem, results, early),
            "gradient_check": checks, "fd_vs_manual": _agreement(results)}


# Task order of the methods, longest first (a method not listed goes first), so that
# the workers finish together: on the default run, and next to big data, where
# Procrustes-Lloyd's pass over the data each round makes it the longest.
_LONGEST_FIRST = ("fd_ste", "rotation", "ema_ste", "manual_ste", "procrustes_lloyd")
_LONGEST_FIRST_BIG = ("procrustes_lloyd", "fd_ste", "rotation", "ema_ste", "manual_ste")


def _apply(fn, *args):
    return fn(*args)


def _score(problem, res):
    """Eval metrics of a trained model into its result (where the method ran)."""
    cfg = problem.cfg
    if res["status"] != "ok":          # a diverged run keeps its last finite parameters, unscored
        return res
    with np.errstate(all="ignore"):
        m = metrics(res["W"], res["E"], problem.X_eval)
    if not all(math.isfinite(v) for v in m.values()):
        res.update(status="diverged", diverged_at_step=cfg.steps,
                   note="parameters finite but their eval error overflows")
        return res
    res.update(m)
    res["subspace_angle_deg"] = (subspace_angle_deg(res["W"], problem.U[:, :cfg.m])
                                 if cfg.m <= cfg.rank else None)
    return res


def _on_problem(fn, cfg, X_train, X_eval, U, lam, W0, E0, eval_sq, score=False):
    """``fn(problem)`` on the problem rebuilt from its arrays (in a worker process),
    with the seconds it took there; ``score``: a method's result, scored there too
    (its seconds are the training's)."""
    t0 = time.perf_counter()
    problem = Problem(cfg, X_train, X_eval, U, lam, W0, E0, 0.0, None, eval_sq)
    out = fn(problem)
    seconds = time.perf_counter() - t0
    return (_score(problem, out) if score else out), seconds


def _read_only(a):
    """A read-only view of ``a``: tasks share the problem's arrays (threads next to big
    data), so one writing into them would change the others' input; it raises instead."""
    v = a.view()
    v.flags.writeable = False
    return v


def _run_methods(problem):
    """The methods of ``problem.cfg``, the gradient checks and, when not computed yet,
    the unconstrained reference: one batch of independent tasks, spread over worker
    processes next to small data (each result is the same wherever it runs), on
    threads next to big data, with the population errors of the models done by then.
    Returns (results by method, gradient checks, population columns computed)."""
    cfg = problem.cfg
    skip = {n: _fd_skip_reason(cfg) for n in cfg.methods if n == "fd_ste"}
    big = _data_bytes(cfg) > _BIG_DATA
    order = _LONGEST_FIRST_BIG if big else _LONGEST_FIRST
    names = sorted((n for n in cfg.methods if n != "pca_lloyd" and not skip.get(n)),
                   key=lambda n: order.index(n) if n in order else -1)
    arrays = (cfg, *(_read_only(a) for a in (problem.X_train, problem.X_eval, problem.U, problem.lam,
                                              problem.W0, problem.E0)), _eval_sq(problem))
    tasks = [(_on_problem, METHODS[n], *arrays, True) for n in names]
    ref_tasks = []
    if problem.reference is None:
        S_train = _rank_coords(problem.X_train, problem.U)
        ref_tasks = [(_restart, *a) for a in _reference_tasks(cfg, S_train) + [_lifted_task(
            cfg, problem.W0, problem.E0, problem.U, S_train)]]
    checks = (_on_problem, _gradient_checks, *arrays)
    early = {}
    if big:                                                # threads share the big data
        # Population errors while the last methods train: a last task scores the models
        # done by the time it starts (on the thread that would idle); a method that
        # finishes after that scores its own. The same columns wherever they are computed.
        finished, late, started, lock = {}, {}, [], threading.Lock()
        scored = cfg.n_pop > 0 and problem.reference is not None

        def columns(models):
            return population_columns(models, problem.U, problem.lam, cfg.n_pop,
                                      derived_rng(cfg.seed, "population"))

        def method(name, *task):
            out = _apply(*task)
            with lock:
                finished[name] = out[0]
                after = bool(started)
            if after and scored and out[0]["status"] == "ok":
                late.update(columns({name: (out[0]["W"], out[0]["E"])}))
            return out

        def early_population():
            with lock:
                started.append(True)
                models = {n: (r["W"], r["E"]) for n, r in finished.items() if r["status"] == "ok"}
            if not scored:
                return {}
            if "pca_lloyd" in cfg.methods:
                models["pca_lloyd"] = (problem.W0, problem.E0)
            models["unconstrained_kmeans"] = problem.reference[0]
            return columns(models)
        out = run_threads(_apply, [(method, n, *t) for n, t in zip(names, tasks)] + ref_tasks
                          + [checks, (early_population,)], cfg.workers)
        early = {**out.pop(), **late}
    else:
        out = run_tasks(_apply, tasks + ref_tasks + [checks], cfg.workers)
    done = dict(zip(names, out))
    if ref_tasks:
        _set_reference(problem, out[len(names):len(names) + len(ref_tasks)])
    results = {}
    for name in cfg.methods:
        if name == "pca_lloyd":
            t0 = time.perf_counter()
            res = method_pca_lloyd(problem)
            res["seconds"] = time.perf_counter() - t0 + problem.start_seconds
            _score(problem, res)
        elif skip.get(name):
            res = _result(None, None, status="skipped", note=skip[name])
            res["seconds"] = 0.0
        else:
            res, res["seconds"] = done[name]
        results[name] = res
    return results, out[-1][0], early


def _rank_coords(X, U):
    """Coordinates ``X @ U`` (n, rank) in float64 of data that lie in span(U),
    Fortran-ordered (for :func:`lloyd_run`)."""
    return tall_product(X.astype(np.float64, copy=False), U.T, "F")


def _reference_tasks(cfg, S_train):
    return _restart_tasks(S_train, cfg.K, derived_rng(cfg.seed, "unconstrained"), _restarts(cfg),
                          cfg.kmeans_iter)


def unconstrained_reference(problem):
    """K-means with K codes in data space (no rank-m restriction): the same number of
    k-means++ restarts as the baseline, plus a start from the baseline's codebook lifted
    into data space (so the reference is never worse on the training data than the
    rank-m baseline). The data lie in span(U), so it works in the rank-``rank``
    coordinates ``S_train = X_train @ U``. Computed once per problem (by
    :func:`make_problem` or :func:`compare`, in a batch with other work, or here).

    Returns (C (K, rank), eval recon_mse, seconds of compute summed over processes).
    """
    if problem.reference is None:
        cfg = problem.cfg
        S_train = _rank_coords(problem.X_train, problem.U)
        lifted = _lifted_task(cfg, problem.W0, problem.E0, problem.U, S_train)
        _set_reference(problem, run_tasks(_restart, _reference_tasks(cfg, S_train) + [lifted],
                                          cfg.workers))
    return problem.reference


def _lifted_task(cfg, W0, E0, U, S_train):
    """Arguments of :func:`_restart` for the reference's start from the baseline's
    codebook ``E0`` lifted into the rank coordinates."""
    lifted = E0.astype(np.float64) @ (W0.astype(np.float64) @ U)
    return (S_train, cfg.K, None, cfg.kmeans_iter, 0.0, lifted)


def _set_reference(problem, runs):
    """problem.reference from the reference's k-means runs: the best codebook, its eval
    error and the compute seconds."""
    C = _best(runs).E
    t0 = time.perf_counter()
    X_eval = problem.X_eval.astype(np.float64, copy=False)
    S_eval = X_eval @ problem.U
    out_of_span = np.einsum("nd,nd->n", X_eval, X_eval) - np.einsum("nr,nr->n", S_eval, S_eval)
    eval_err = float(np.mean(nearest(S_eval, C)[1] + out_of_span))
    problem.reference = (C, eval_err, time.perf_counter() - t0 + sum(r.seconds for r in runs))


def _bounds(problem, results, columns=None):
    """Floors, the unconstrained reference and the population errors of every model
    (``columns``: per-sample errors of some models, see :func:`population_columns`)."""
    cfg = problem.cfg
    t0 = time.perf_counter()
    C, uncon_eval, ref_seconds = unconstrained_reference(problem)
    bounds = {"pca_floor": pca_floor(problem.lam, cfg.m),
              "shannon_bound": shannon_bound(problem.lam, cfg.K),
              "unconstrained_kmeans": None, "unconstrained_kmeans_se": None,
              "unconstrained_kmeans_eval": uncon_eval, "n_pop": cfg.n_pop}
    models = {n: (r["W"], r["E"]) for n, r in results.items() if r["status"] == "ok"}
    models["unconstrained_kmeans"] = C
    if cfg.n_pop > 0:
        pop = population_errors(models, problem.U, problem.lam, cfg.n_pop,
                                derived_rng(cfg.seed, "population"), threads=cfg.workers,
                                columns=columns)
        for i, name in enumerate(pop.names):
            if name in results:
                results[name]["pop_recon_mse"] = float(pop.mean[i])
                results[name]["pop_recon_se"] = float(pop.se[i])
        j = pop.names.index("unconstrained_kmeans")
        bounds["unconstrained_kmeans"], bounds["unconstrained_kmeans_se"] = float(pop.mean[j]), float(pop.se[j])
        ranked = [n for n in pop.names if n in results]
        if ranked:
            best = min(ranked, key=lambda n: results[n]["pop_recon_mse"])
            bounds["best_method"] = best
            for name in ranked:
                r = results[name]
                r["pop_diff_to_best"] = r["pop_recon_mse"] - results[best]["pop_recon_mse"]
                r["pop_diff_to_best_se"] = pop.diff_se(name, best)
                if "pca_lloyd" in ranked:
                    r["pop_diff_to_baseline"] = r["pop_recon_mse"] - results["pca_lloyd"]["pop_recon_mse"]
                    r["pop_diff_to_baseline_se"] = pop.diff_se(name, "pca_lloyd")
    bounds["seconds"] = time.perf_counter() - t0
    bounds["unconstrained_kmeans_seconds"] = ref_seconds
    return bounds


def _agreement(results):
    """How closely fd_ste followed manual_ste (same start, batches and optimizer)."""
    a, b = results.get("fd_ste"), results.get("manual_ste")
    if not (a and b and a["status"] == "ok" and b["status"] == "ok"):
        return None
    return {"max_rel_metric_diff": max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300)
                                       for k in _METRIC_KEYS if b[k] != 0 or a[k] != 0),
            "max_abs_W_diff": float(np.max(np.abs(a["W"] - b["W"]))),
            "max_abs_E_diff": float(np.max(np.abs(a["E"] - b["E"])))}


# ----------------------------------------------------------------------------
# Reporting and plots
# ----------------------------------------------------------------------------

LABELS = {"pca_lloyd": "PCA + Lloyd", "fd_ste": "FD STE (autograd stand-in)",
          "manual_ste": "Manual STE", "rotation": "Rotation trick", "ema_ste": "EMA STE",
          "procrustes_lloyd": "Procrustes-Lloyd"}


def _pct(x, ref):
    return 100.0 * (x - ref) / ref


def format_report(summary):
    """The console table: eval metrics, population error with its noise, gaps to floors."""
    res, b = summary["results"], summary["bounds"]
    base = res.get("pca_lloyd", {}).get("pop_recon_mse")
    head = (f"{'Method':<28}{'Recon MSE':>10}{'In-Sub':>9}{'Ent':>7}{'Dead':>6}{'Perp':>7}"
            f"{'Pop MSE ± se':>19}{'vs base':>9}{'vs best':>9}{'vs Shan':>9}{'vs unc':>8}{'Time s':>8}")
    lines = ["=" * len(head), "SUMMARY  (recon = mean ||x - x_hat||^2; eval set of "
             f"{summary['config']['n_eval']} samples; pop = {b['n_pop']:,} fresh samples)", "=" * len(head),
             head, "-" * len(head)]
    for name, r in res.items():
        label = LABELS.get(name, name)
        if r["status"] != "ok":
            what = r["status"] + (f" at step {r['diverged_at_step']}" if r["diverged_at_step"] else "")
            note = r["note"].removeprefix("skipped: ")
            lines.append(f"{label:<28}{what}: {note}"[:200])
            continue
        row = (f"{label:<28}{r['recon_mse']:>10.5f}{r['in_sub_dist']:>9.4f}{r['usage_entropy']:>7.3f}"
               f"{r['dead_frac']:>6.2f}{r['perplexity']:>7.2f}")
        if "pop_recon_mse" in r:
            p = r["pop_recon_mse"]
            tie = abs(r["pop_diff_to_best"]) < 2 * r["pop_diff_to_best_se"] and r["pop_diff_to_best"] != 0
            best = "best" if r["pop_diff_to_best"] == 0 else ("tie" if tie else f"{_pct(p, p - r['pop_diff_to_best']):+.2f}%")
            row += (f"{p:>11.5f} ± {r['pop_recon_se']:.4f}"
                    f"{(f'{_pct(p, base):+.2f}%' if base else '-'):>9}{best:>9}"
                    f"{_pct(p, b['shannon_bound']):>+8.1f}%{_pct(p, b['unconstrained_kmeans']):>+7.2f}%")
        else:
            row += f"{'-':>19}{'-':>9}{'-':>9}{'-':>9}{'-':>8}"
        lines.append(row + f"{r['seconds']:>8.2f}")
    lines.append("-" * len(head))
    lines.append(f"Floors: PCA floor {b['pca_floor']:.5f}   Shannon bound {b['shannon_bound']:.5f}   "
                 "unconstrained k-means "
                 + (f"{b['unconstrained_kmeans']:.5f} ± {b['unconstrained_kmeans_se']:.4f} (pop), "
                    if b["unconstrained_kmeans"] is not None else "")
                 + f"{b['unconstrained_kmeans_eval']:.5f} (eval)")
    lines.append("vs best: 'tie' = within 2 paired standard errors of the best method (not "
                 "separable with this n_pop); vs Shan / vs unc: gap to the Shannon bound / the "
                 "unconstrained reference")
    g = summary["gradient_check"]
    lines.append(f"Gradient check (manual vs finite differences, {g['measure']}): STE gW {g['ste']['gW_rel_err']:.1e} "
                 f"gE {g['ste']['gE_rel_err']:.1e}; rotation gW {g['rotation']['gW_rel_err']:.1e} "
                 f"gE {g['rotation']['gE_rel_err']:.1e}")
    a = summary["fd_vs_manual"]
    if a:
        lines.append(f"fd_ste vs manual_ste after training: largest relative metric difference "
                     f"{a['max_rel_metric_diff']:.1e}, largest |W| difference {a['max_abs_W_diff']:.1e}")
    lines.append(f"Total {summary['total_seconds']:.2f} s")
    return "\n".join(lines)


def _json_ready(obj):
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items() if k not in ("W", "E", "logs")}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_atomic(path, write):
    """Write a file through ``write(file_object)`` into a temporary, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
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
    """summary.json, <method>_logs.json, comparison.png, training_curves.png."""
    os.makedirs(outdir, exist_ok=True)
    write_json(os.path.join(outdir, "summary.json"), summary)
    for name, r in summary["results"].items():
        if r.get("logs") is not None and name != "pca_lloyd":
            write_json(os.path.join(outdir, f"{name}_logs.json"),
                       {"method": name, "status": r["status"], **r["logs"]})
    save_figure(plot_comparison(summary), os.path.join(outdir, "comparison.png"))
    save_figure(plot_training_curves(summary), os.path.join(outdir, "training_curves.png"))
    if summary["config"].get("per_method_plots"):
        for name in summary["results"]:
            if name in GRADIENT_METHODS and summary["results"][name].get("logs"):
                save_figure(plot_training_curves(summary, only=name), os.path.join(outdir, f"{name}.png"))


def save_figure(fig, path):
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=90))


def _figure(w, h, nrows=1, ncols=1):
    from matplotlib.figure import Figure                   # no pyplot: no display, no global state
    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


_COLORS = {"pca_lloyd": "0.35", "fd_ste": "tab:orange", "manual_ste": "tab:blue",
           "rotation": "tab:green", "ema_ste": "tab:purple", "procrustes_lloyd": "tab:red"}


def plot_comparison(summary):
    """Left: every method against the floors. Right: % difference to the baseline, zoomed."""
    res, b = summary["results"], summary["bounds"]
    names = [n for n, r in res.items() if r["status"] == "ok"]
    use_pop = all("pop_recon_mse" in res[n] for n in names) and names
    key = "pop_recon_mse" if use_pop else "recon_mse"
    vals = np.array([res[n][key] for n in names])
    ses = np.array([res[n].get("pop_recon_se", 0.0) for n in names]) if use_pop else np.zeros(len(names))
    fig, ax = _figure(12, 1.2 + 0.45 * max(len(names), 3), 1, 2)
    ax0, ax1 = ax[0]
    y = np.arange(len(names))[::-1]
    colors = [_COLORS.get(n, "k") for n in names]
    ax0.scatter(vals, y, c=colors, zorder=3)
    refs = [("PCA floor", b["pca_floor"], ":"), ("Shannon bound", b["shannon_bound"], "--")]
    uncon = b["unconstrained_kmeans"] if use_pop else b["unconstrained_kmeans_eval"]
    refs.append(("unconstrained k-means", uncon, "-."))
    for label, v, ls in refs:
        ax0.axvline(v, color="k", ls=ls, lw=1, label=f"{label} {v:.4f}")
    ax0.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax0.set_yticks(y, [LABELS.get(n, n) for n in names])
    ax0.set_xlim(0, max(vals.max(), uncon) * 1.08)
    ax0.set_ylim(-0.7, len(names) + 1.6)
    ax0.set_xlabel(("population" if use_pop else "eval-set") + " reconstruction MSE (with floors)")
    ax0.grid(axis="x", alpha=0.3)
    if "pca_lloyd" in names:
        ref = res["pca_lloyd"][key]
        pct = 100 * (vals - ref) / ref
        err = 200 * np.array([res[n].get("pop_diff_to_baseline_se", 0.0) for n in names]) / ref \
            if use_pop else None
        ax1.barh(y, pct, xerr=err, color=colors, capsize=3, height=0.6)
        if use_pop:
            ax1.axvline(100 * (uncon - ref) / ref, color="k", ls="-.", lw=1, label="unconstrained k-means")
            ax1.legend(loc="upper right", fontsize=8)
        eval_pct = 100 * (np.array([res[n]["recon_mse"] for n in names]) - res["pca_lloyd"]["recon_mse"]) \
            / res["pca_lloyd"]["recon_mse"]
        ax1.scatter(eval_pct, y, marker="x", color="k", zorder=3, label="eval set")
        extra = [100 * (uncon - ref) / ref] if use_pop else []
        span = max(np.abs(np.concatenate([pct, eval_pct, extra])).max(), 0.05)
        for yi, p in zip(y, pct):
            ax1.annotate(f"{p:+.2f}%", (p, yi), xytext=(4 if p >= 0 else -4, 6), textcoords="offset points",
                         ha="left" if p >= 0 else "right", fontsize=8)
        ax1.set_xlim(-1.35 * span, 1.35 * span)
        ax1.set_ylim(ax0.get_ylim())                       # each method on one line across both panels
        ax1.axvline(0, color="k", lw=0.8)
        ax1.set_yticks(y, [""] * len(names))
        ax1.set_xlabel("% vs PCA + Lloyd" + (" (bars: population, ±2 paired se; x: eval set)" if use_pop else ""))
        ax1.grid(axis="x", alpha=0.3)
    c = summary["config"]
    fig.suptitle(f"D={c['D']} rank={c['rank']} m={c['m']} K={c['K']} steps={c['steps']} seed={c['seed']}",
                 fontsize=10)
    fig.subplots_adjust(left=0.2, right=0.98, bottom=0.14, top=0.9, wspace=0.05)
    return fig


def plot_training_curves(summary, only=None):
    """Eval metrics along training, every gradient method overlaid, one panel per metric."""
    res = summary["results"]
    names = [n for n in GRADIENT_METHODS if n in res and res[n].get("logs") and (only in (None, n))]
    panels = [("recon_mse", "eval recon MSE"), ("in_sub_dist", "eval in-subspace distortion"),
              ("perplexity", "eval code perplexity"),
              ("subspace_angle_deg", "largest angle to the true top-m eigenspace (deg)")]
    fig, axes = _figure(11, 7, 2, 2)
    for ax, (key, title) in zip(axes.ravel(), panels):
        for name in names:
            logs = res[name]["logs"]
            style = dict(color=_COLORS.get(name), label=LABELS.get(name, name), lw=1.5)
            if name == "fd_ste":                           # drawn under manual_ste: markers stay visible
                style.update(marker="o", ms=4, lw=0, markevery=max(1, len(logs["eval"]) // 12))
            pts = [(e["step"], e[key]) for e in logs["eval"] if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), **style)
        for ref in ("pca_lloyd", "procrustes_lloyd"):
            if ref in res and res[ref]["status"] == "ok" and res[ref].get(key) is not None:
                ax.axhline(res[ref][key], color=_COLORS[ref], ls="--", lw=1, label=LABELS[ref])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(labels),
               fontsize=8, frameon=False)                  # above the panels: hides no curve
    fig.suptitle("Training curves (same start, same batches; fd_ste markers sit on manual_ste)", fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.88, hspace=0.35, wspace=0.2)
    return fig


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):                              # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_flags(p, skip=(), defaults=True):
    """One flag per :class:`Config` field (its help is the field's), except ``skip``.

    ``defaults=False`` leaves unset flags as None (a caller fills them in).
    """
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag, help_ = f"--{f.name}", f.metadata["help"]
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=help_)
        elif f.name == "methods":
            p.add_argument(flag, nargs="+", default=list(f.default), metavar="NAME", help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default if defaults else None,
                           help=help_ if defaults else f"{help_} (default {f.default})")
    return p


def build_parser():
    p = _Parser(prog="vq_compare.py", description=__doc__.split("\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_config_flags(p)


def _load_plotting():
    import matplotlib
    matplotlib.use("Agg")                                  # never needs a display
    import matplotlib.backends.backend_agg                 # noqa: F401
    import matplotlib.figure                               # noqa: F401


def load_plotting_in_background():
    """For the CLIs: import matplotlib with the Agg backend on a thread (0.3 s; a first
    run builds its font cache) while the caller computes. Only the plots at the end need
    it, and importing a module that another thread is importing waits for that import.
    Returns the thread; join it before returning."""
    loader = threading.Thread(target=_load_plotting)
    loader.start()
    return loader


def main(argv=None):
    """CLI entry point: ``python vq_compare.py [--flag value ...]``."""
    args = build_parser().parse_args(argv)
    settings = vars(args)
    settings["methods"] = [m for item in settings["methods"] for m in item.split(",") if m]
    try:
        cfg = make_config(**settings)
    except ConfigError as e:
        sys.stderr.write(f"vq_compare.py: error: {e}\n")
        return 2
    # matplotlib is imported while the start point is computed; next to big data only
    # after it, when the workers are gone (their memory and its would add up)
    big = _data_bytes(cfg) > _BIG_DATA
    loaders = [] if big else [load_plotting_in_background()]

    def after_start():                                     # make_problem let the workers go
        loaders.append(load_plotting_in_background())
    try:
        _run(cfg, after_start if big else None)            # small data: the workers run the methods
    finally:
        for loader in loaders:
            loader.join()
    return 0


if __name__ == "__main__":
    import vq_compare                                      # this file as a module, so that worker
    sys.exit(vq_compare.main())                            # processes can import what they run
