"""Tests of vq_compare (and sweeps): why the numbers can be trusted.

Run with ``python -m pytest`` (this also runs the doctests of vq_compare.py).
Every check compares two independent computations, an invariant, or a case worked
out by hand; tolerances are stated next to each assert.
"""
import csv
import dataclasses
import doctest
import itertools
import json
import math
import zlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vq_compare as vq

HERE = os.path.dirname(os.path.abspath(__file__))
BUILT_IN = tuple(vq.METHODS)     # the registry as shipped, before any test adds to it
TINY = dict(D=12, rank=4, m=3, K=8, n_train=600, n_eval=300, steps=15, batch=64,
            n_pop=20000, n_init=2, log_every=5, outdir=None, quiet=True,
            workers=1)   # in this process: tests that patch functions see every call


def true_loss(W, E, X, alpha, beta):
    """The VQ-VAE loss on a batch from its definition: no stop-gradient matters for its value."""
    Z = X @ W.T
    Q = E[np.argmin(((Z[:, None, :] - E[None]) ** 2).sum(-1), axis=1)]
    return (np.sum((X - Q @ W) ** 2) + (alpha + beta) * np.sum((Z - Q) ** 2)) / len(X)


def random_point(rng, B, D, m, K, orthonormal=True):
    X = rng.normal(size=(B, D))
    W = rng.normal(size=(m, D))
    W = vq.stiefel_project(W) if orthonormal else 0.4 * W
    E = rng.normal(size=(K, m))
    return W, E, X


# ---------------------------------------------------------------- doctests

def test_doctests_of_vq_compare():
    result = doctest.testmod(vq, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8
    assert result.failed == 0


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("block,n_train", [(8192, 50), (16, 50), (64, 1001), (32, 333)])
def test_data_is_the_original_recipe(monkeypatch, block, n_train):
    monkeypatch.setattr(vq, "_DRAW_ROWS", block)         # drawn block by block, same numbers
    D, rank, n_eval, seed = 16, 3, 20, 7
    rng = np.random.default_rng(seed)                     # the original recipe, written out again
    U, _ = np.linalg.qr(rng.normal(size=(D, rank)))
    lam = np.geomspace(4.0, 0.25, rank)
    Sigma = (U * lam) @ U.T
    Xt = rng.multivariate_normal(np.zeros(D), Sigma, size=n_train)
    Xe = rng.multivariate_normal(np.zeros(D), Sigma, size=n_eval)
    got = vq.make_lowrank_data(D, rank, n_train, n_eval, seed)
    assert got[2].tobytes() == Sigma.tobytes()             # the same code: the same bits
    for a, b in zip(got[:2], (Xt, Xe)):
        # the same normals times the same factor, but a product over blocks of rows may
        # round each D-term dot product differently: D ulps of the largest entry
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= D * np.finfo(float).eps * np.abs(b).max()
        assert not np.signbit(a[a == 0]).any()              # no -0.0, as NumPy's mean + ...
    U2, lam2 = vq.lowrank_factor(D, rank, seed)
    # the factor of the covariance the data used: a rank-term product, rank ulps of its largest entry
    assert np.abs((U2 * lam2) @ U2.T - Sigma).max() <= rank * np.finfo(float).eps * np.abs(Sigma).max()


# ---------------------------------------------------------------- geometry

def test_stiefel_project_is_the_nearest_orthonormal_matrix():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 9))
    P = vq.stiefel_project(W)
    assert np.allclose(P @ P.T, np.eye(4), atol=1e-12)
    for _ in range(50):                                   # no other orthonormal-row matrix is closer
        Q = vq.stiefel_project(P + 0.1 * rng.normal(size=P.shape))
        assert np.linalg.norm(W - P) <= np.linalg.norm(W - Q) + 1e-12


def test_riemannian_step_keeps_rows_orthonormal_and_descends_tangentially():
    rng = np.random.default_rng(1)
    W = vq.stiefel_project(rng.normal(size=(3, 10)))
    for _ in range(300):
        W = vq.riemannian_step(W, rng.normal(size=W.shape), 0.3)
        assert np.abs(W @ W.T - np.eye(3)).max() < 1e-10
    G = rng.normal(size=W.shape)                          # the projected gradient is tangent
    sym = G @ W.T
    G_R = G - 0.5 * (sym + sym.T) @ W
    T = G_R @ W.T
    assert np.abs(T + T.T).max() < 1e-12


# ---------------------------------------------------------------- gradients

SHAPES = [(40, 6, 2, 4), (64, 10, 3, 7), (200, 16, 4, 12), (33, 5, 5, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["ste", "rotation"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.25), (0.3, 2.0), (0.0, 0.0)])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_manual_gradients_match_finite_differences(shape, estimator, alpha, beta, orthonormal):
    rng = np.random.default_rng(zlib.crc32(repr((shape, estimator, alpha, beta, orthonormal)).encode()))
    W, E, X = random_point(rng, *shape, orthonormal=orthonormal)
    man = vq.manual_grads(W, E, X, alpha, beta, estimator)
    fd = vq.fd_grads(W, E, X, alpha, beta, estimator, h=1e-5)
    # central differences: O(h^2) truncation plus O(eps |L| / h) rounding, ~1e-9 here
    assert vq.rel_err(fd.gW, man.gW) <= 1e-6
    if alpha > 0:
        assert vq.rel_err(fd.gE, man.gE) <= 1e-6
    else:
        assert np.abs(fd.gE).max() < 1e-8 and np.abs(man.gE).max() == 0
    assert abs(fd.loss - man.loss) <= 1e-12 * abs(man.loss)


@pytest.mark.parametrize("estimator", [e for e in vq.ESTIMATORS if e not in ("ste", "rotation")])
@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.25), (0.0, 0.0)])
def test_new_estimators_match_finite_differences_with_their_noise_fixed(estimator, orthonormal, alpha, beta):
    rng = np.random.default_rng(zlib.crc32(repr((estimator, orthonormal, alpha, beta)).encode()))
    for shape in SHAPES:
        W, E, X = random_point(rng, *shape, orthonormal=orthonormal)
        fr = vq.freeze(W, E, X, estimator, np.random.default_rng(7))
        man = vq.manual_grads(W, E, X, alpha, beta, estimator, frozen=fr)
        fd = vq.fd_grads(W, E, X, alpha, beta, estimator, frozen=fr)
        assert vq.rel_err(fd.gW, man.gW) <= 1e-6 and vq.rel_err(fd.gE, man.gE) <= 1e-6
        assert abs(fd.loss - man.loss) <= 1e-12 * abs(man.loss)


def test_noise_substitution_keeps_the_distance_and_averages_to_the_latent():
    rng = np.random.default_rng(31)
    W, E, X = random_point(rng, 20, 6, 3, 4)
    X = np.repeat(X, 4000, axis=0)                          # every sample 4000 times
    fr = vq.freeze(W, E, X, "nsvq", np.random.default_rng(2))
    F = fr.Z0 + np.linalg.norm(fr.Z0 - fr.Q0, axis=1, keepdims=True) * fr.u
    assert np.allclose(np.linalg.norm(F - fr.Z0, axis=1), np.linalg.norm(fr.Q0 - fr.Z0, axis=1), rtol=1e-12)
    mean = F.reshape(20, 4000, 3).mean(axis=1)              # E[u] = 0: the mean is z, to 4 sigma
    spread = np.linalg.norm(fr.Q0 - fr.Z0, axis=1)[::4000, None] / np.sqrt(3 * 4000)
    assert np.all(np.abs(mean - fr.Z0[::4000]) <= 4 * spread + 1e-12)
    d = vq.freeze(W, E, X[:20], "diveq", np.random.default_rng(3), noise=0.0)   # DiVeQ-Detach: F = q
    Fd = d.Z0 + np.linalg.norm(d.Z0 - d.Q0, axis=1, keepdims=True) * d.u
    assert np.allclose(Fd, d.Q0, rtol=0, atol=1e-12)


def _tangent(W, G):
    sym = G @ W.T
    return G - 0.5 * (sym + sym.T) @ W


@pytest.mark.parametrize("estimator", ["nsvq", "diveq"])
def test_tied_orthonormal_nsvq_and_diveq_are_ste_with_alpha_1_beta_1(estimator):
    # With q~ = z + n u and W W^T = I: the code receives (2/B)(q - z), whatever u, and the
    # encoder's gradient differs from STE(1, 1)'s by a symmetric matrix times W, which the
    # Riemannian step removes: the same trajectory
    rng = np.random.default_rng(33)
    W, E, X = random_point(rng, 300, 10, 3, 7)
    for seed in range(3):
        g = vq.manual_grads(W, E, X, 0.0, 0.0, estimator, rng=np.random.default_rng(seed))
        s = vq.manual_grads(W, E, X, 1.0, 1.0, "ste")
        # the same sums in another order: rounding of B = 300 terms, far below 1e-10
        assert np.allclose(g.gE, s.gE, rtol=0, atol=1e-10 * np.abs(s.gE).max())
        assert np.allclose(_tangent(W, g.gW), _tangent(W, s.gW), rtol=0, atol=1e-10 * np.abs(s.gW).max())
        assert not np.allclose(g.gW, s.gW)                   # the Euclidean gradients differ
    out = vq.run_comparison(**{**TINY, "alpha": 1.0, "beta": 1.0, "methods": ["manual_ste", estimator]})
    a, b = out["results"]["manual_ste"], out["results"][estimator]
    assert np.abs(a["W"] - b["W"]).max() < 1e-9 and np.abs(a["E"] - b["E"]).max() < 1e-9


def test_synchronized_commitment_matches_finite_differences_and_is_ste_with_alpha_plus_nu():
    rng = np.random.default_rng(35)
    for orthonormal in (True, False):
        W, E, X = random_point(rng, 120, 9, 3, 6, orthonormal=orthonormal)
        fr = vq.freeze(W, E, X, "ste", nu=0.7)
        man, fd = vq.manual_grads(W, E, X, 0.4, 0.3, frozen=fr), vq.fd_grads(W, E, X, 0.4, 0.3, frozen=fr)
        assert vq.rel_err(fd.gW, man.gW) <= 1e-6 and vq.rel_err(fd.gE, man.gE) <= 1e-6
        if orthonormal:                                     # tied, W W^T = I: alpha -> alpha + nu
            ste = vq.manual_grads(W, E, X, 0.4 + 0.7, 0.3)
            assert np.allclose(man.gE, ste.gE, rtol=0, atol=1e-12) and np.allclose(man.gW, ste.gW, rtol=0, atol=1e-12)


def _fd(f, P, h=1e-6):
    """Central differences of the scalar f over every entry of P."""
    g = np.zeros(P.size)
    for i in range(P.size):
        d = np.zeros(P.size)
        d[i] = h
        g[i] = (f(P + d.reshape(P.shape)) - f(P - d.reshape(P.shape))) / (2 * h)
    return g.reshape(P.shape)


def test_affine_and_simvq_codebook_gradients_by_the_chain_rule():
    rng = np.random.default_rng(37)
    W, C, X = random_point(rng, 100, 8, 3, 6)
    hp = vq.types.SimpleNamespace(a=2.0)
    params = {"C": C, "s": 0.1 * rng.normal(size=3), "t": 0.1 * rng.normal(size=3)}
    E = vq.affine_codebook(params, hp)
    fr = vq.freeze(W, E, X, "ste", nu=2.0)                  # assignments frozen at the point
    loss = lambda E_: vq.surrogate_loss(W, E_, X, fr, 1.0, 0.25)
    hand = vq.affine_grads(params, vq.manual_grads(W, E, X, 1.0, 0.25, frozen=fr).gE, hp)
    for name in ("C", "s", "t"):                            # one entry at a time, by this test's loop
        fd = _fd(lambda x: loss(vq.affine_codebook({**params, name: x}, hp)), params[name])
        assert vq.rel_err(fd, hand[name]) < 1e-6
    P, b = np.eye(3) + 0.1 * rng.normal(size=(3, 3)), 0.1 * rng.normal(size=3)   # SimVQ: E = C P^T + b
    E = C @ P.T + b
    fr = vq.freeze(W, E, X, "ste")
    G = vq.manual_grads(W, E, X, 1.0, 0.25, frozen=fr).gE
    assert vq.rel_err(_fd(lambda P_: vq.surrogate_loss(W, C @ P_.T + b, X, fr, 1.0, 0.25), P), G.T @ C) < 1e-6
    assert vq.rel_err(_fd(lambda b_: vq.surrogate_loss(W, C @ P.T + b_, X, fr, 1.0, 0.25), b), G.sum(0)) < 1e-6
    # at s = t = 0 (P = I, b = 0) both forward the plain codebook: the start is shared
    # 1 * C + 0 rounds nothing in IEEE arithmetic; another code path all the same: one ulp
    np.testing.assert_allclose(vq.affine_codebook({"C": C, "s": np.zeros(3), "t": np.zeros(3)}, hp), C,
                               rtol=np.finfo(float).eps, atol=0)


def test_wasserstein_distance_its_gradients_and_its_closed_form():
    rng = np.random.default_rng(39)
    for n, K, m in [(60, 12, 3), (200, 40, 4), (30, 3, 4)]:    # the last: K < m, S_c singular
        Z = rng.normal(size=(n, m)) * rng.uniform(0.5, 2, size=m) + 1.0
        E = rng.normal(size=(K, m))
        Wd, gZ, gE = vq.wasserstein_grads(Z, E)
        assert math.isfinite(Wd) and np.isfinite(gZ).all() and np.isfinite(gE).all()
        assert vq.rel_err(_fd(lambda Z_: vq.wasserstein_grads(Z_, E)[0], Z, 1e-5), gZ) < 1e-6
        assert vq.rel_err(_fd(lambda E_: vq.wasserstein_grads(Z, E_)[0], E, 1e-5), gE) < 1e-6
    # closed form: between N(mu1, diag(a)) and N(mu2, diag(b)) the squared distance is
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2; fits of whitened samples hit it exactly
    def cloud(mu, sd, k):
        G = rng.normal(size=(k, 2))
        G = (G - G.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(G.T, bias=True)).T)
        return G * sd + mu
    Wd = vq.wasserstein_grads(cloud([1.0, 0.0], [2.0, 0.5], 500), cloud([0.0, 0.0], [1.0, 1.0], 300))[0]
    assert Wd == pytest.approx(math.sqrt(1 + 1 + 0.25 + 1e-8), rel=1e-9)


def test_method_hyperparameters_come_from_the_registry_and_reach_the_method():
    # with a = 0 the affine codebook is the plain one, and in the tied orthonormal model the
    # synchronized commitment nu is STE with alpha + nu: the flag's value reaches the method
    # exactly when the two trajectories meet
    assert set(vq.make_config().method_params) == set(vq.declared_params())
    settings = {**TINY, "alpha": 1.0, "beta": 0.25, "affine_ste_a": 0.0}
    sync = vq.run_comparison(**settings, methods=["affine_ste"], affine_ste_nu=0.5)["results"]["affine_ste"]
    ste = vq.run_comparison(**{**settings, "alpha": 1.5, "affine_ste_a": 2.0},     # a: affine's own
                            methods=["manual_ste"])["results"]["manual_ste"]
    default = vq.run_comparison(**settings, methods=["affine_ste"])["results"]["affine_ste"]      # nu = 2
    assert np.abs(sync["E"] - ste["E"]).max() < 1e-9 and np.abs(sync["W"] - ste["W"]).max() < 1e-9
    assert np.abs(default["E"] - ste["E"]).max() > 1e-6
    with pytest.raises(vq.ConfigError, match="unknown method parameter"):
        vq.make_config(method_params={"nope_x": 1.0})


def test_the_readme_method_table_is_the_registry():
    with open(os.path.join(HERE, "README.md")) as fh:
        readme = fh.read()
    rows = [r for r in vq.method_table().splitlines()
            if not r.startswith("| `") or r.split("`")[1] in BUILT_IN]   # methods a user added aside
    assert "\n".join(rows) in readme


def test_sweeps_help_explains_every_flag_sweep_and_preset(capsys, tmp_path):
    import contextlib
    import io
    with pytest.raises(SystemExit):
        sweeps.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in sweeps.build_parser()._actions:
        words = re.findall(r"[a-z]{3,}", (action.help or "").lower())
        assert len(words) >= 3, action.option_strings      # each flag says something
    assert set(sweeps.SWEEP_HELP) == set(sweeps.SWEEPS) and set(sweeps.PRESET_HELP) == set(sweeps.PRESETS)
    for name, what in {**sweeps.SWEEP_HELP, **sweeps.PRESET_HELP}.items():
        assert f"{name}: {' '.join(what.split())}" in text, name
    for key, value in sweeps.QUICK.items():                 # --quick says what it sets
        assert f"--{key} " in text.split("--quick a smoke", 1)[1].split("--preset {", 1)[0], key
    assert "--quiet nothing on the console" in text
    # and --quiet does what it says: nothing on the console, the files written
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert sweeps.main(["--sweep", "K", *for_sweeps("K"), "--outdir", str(tmp_path), "--jobs", "1"]) == 0
    assert out.getvalue() == "" and (tmp_path / "summary.csv").exists()


def test_help_of_config_and_problem_names_every_field():
    for cls in (vq.Config, vq.Problem):
        doc = cls.__doc__.split("Attributes\n    ----------\n", 1)[1]
        documented = {n.strip() for line in re.findall(r"^    (\w[\w, ]*) :", doc, flags=re.M)
                      for n in line.split(",")}
        assert documented == {f.name for f in dataclasses.fields(cls)}, cls


def test_what_the_readme_says_of_the_defaults_is_what_the_code_does():
    with open(os.path.join(HERE, "README.md")) as fh:
        readme = " ".join(fh.read().split())                 # one line: claims wrap
    base = vq.Config()
    stated = re.findall(r"`--(\w+)` \(([0-9][0-9,.]*%?)\)", readme)       # "`--n_pop` (500,000)"
    assert len(stated) >= 2
    for flag, text in stated:
        value = float(text.rstrip("%").replace(",", "")) / (100 if text.endswith("%") else 1)
        assert getattr(base, flag) == pytest.approx(value, rel=1e-12), flag
    words = {"twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16}
    count = re.search(r"\b(" + "|".join(words) + r") methods", readme)
    assert count and words[count.group(1)] == len(BUILT_IN)
    claims = {                                                 # the sentence, and whether it holds
        "with no `--methods` every registered method not marked `in_default=False` runs":
            list(base.methods) == [] and vq.default_methods() == tuple(k for k, m in vq.METHODS.items() if m.in_default),
        "**`--recipe shared`** (the default)": base.recipe == "shared",
        "(`--start`, by default the `pca_lloyd` model)": base.start == "kmeans",
        "writes results_out/": vq.CLI_DEFAULTS["outdir"] == "results_out",
        f"the paired difference to the start on {vq.N_CURVE:,} fresh samples": True,
        "--sweep K --seeds 5 # K in " + " ".join(map(str, sweeps.GRIDS["K"][1])): True,
        "--sweep beta --beta_values " + " ".join(f"{b:g}" for b in sweeps.GRIDS["beta"][1]): True,
        "(opt-in methods run when named in `--methods`": all(
            not m.in_default for k, m in vq.METHODS.items() if k not in vq.default_methods()),
        f"`--n_train` training rows (default 60% of N, at most {base.n_train:,})":
            vq.data_sizes(1000, {})[0] == 600 and vq.data_sizes(10 ** 6, {})[0] == base.n_train,
        f"`--n_eval` eval rows (20%, at most {base.n_eval:,})":
            vq.data_sizes(1000, {})[1] == 200 and vq.data_sizes(10 ** 6, {})[1] == base.n_eval,
        "90% of its variance between the two centres": vq.MIXTURE_CENTRES == 0.9,
    }
    for sentence, holds in claims.items():
        assert sentence in readme and holds, sentence
    p = small_problem()                                        # the kmeans start is pca_lloyd's model itself
    assert p.W0 is p.W_pca and p.E0 is p.E_kmeans


@pytest.mark.parametrize("estimator", vq.ESTIMATORS)
def test_untied_decoder_gradients_match_finite_differences(estimator):
    rng = np.random.default_rng(zlib.crc32(estimator.encode()))
    for shape in SHAPES[:3]:
        W, E, X = random_point(rng, *shape)
        V = W + 0.3 * rng.normal(size=W.shape)              # a decoder apart from the encoder
        fr = vq.freeze(W, E, X, estimator, np.random.default_rng(5))
        man = vq.manual_grads(W, E, X, 0.6, 0.3, estimator, frozen=fr, V=V)
        fd = vq.fd_grads(W, E, X, 0.6, 0.3, estimator, frozen=fr, V=V)
        for a, b in ((fd.gW, man.gW), (fd.gE, man.gE), (fd.gV, man.gV)):
            assert vq.rel_err(a, b) <= 1e-6
        assert abs(fd.loss - man.loss) <= 1e-12 * abs(man.loss)
        tied = vq.manual_grads(W, E, X, 0.6, 0.3, estimator, frozen=fr)     # V = W: the paths add up
        at_w = vq.manual_grads(W, E, X, 0.6, 0.3, estimator, frozen=fr, V=W)
        assert np.allclose(at_w.gW + at_w.gV, tied.gW, rtol=0, atol=1e-12 * np.abs(tied.gW).max())
        assert at_w.loss == pytest.approx(tied.loss, rel=1e-12)


def test_untied_models_are_scored_as_defined():
    rng = np.random.default_rng(41)
    D, rank, m, K = 10, 4, 3, 6
    U, lam = vq.lowrank_factor(D, rank, seed=2)
    W = vq.stiefel_project(rng.normal(size=(m, D)))
    V, E = W + 0.2 * rng.normal(size=W.shape), rng.normal(size=(K, m))
    g = np.random.default_rng(5)
    pop = vq.population_errors({"untied": (W, E, V)}, U, lambda a, c: g.standard_normal((c, rank)) * np.sqrt(lam), 5000)
    X = (np.random.default_rng(5).standard_normal((5000, rank)) * np.sqrt(lam)) @ U.T
    direct = np.sum((X - E[vq.assign(X @ W.T, E)] @ V) ** 2, axis=1)
    assert pop.mean[0] == pytest.approx(direct.mean(), rel=1e-12)
    assert vq.metrics(W, E, X, V=V)["recon_mse"] == pytest.approx(direct.mean(), rel=1e-12)


def test_with_an_untied_decoder_the_tied_equivalences_separate():
    settings = {**TINY, "alpha": 1.0, "beta": 1.0, "methods": ["manual_ste", "nsvq", "diveq"]}
    tied = vq.run_comparison(**settings)
    untied = vq.run_comparison(**{**settings, "decoder": "untied"})
    for name, r in untied["results"].items():
        assert r["status"] == "ok" and r["V"].shape == r["W"].shape and not np.allclose(r["V"], r["W"])
        assert tied["results"][name]["V"] is None
    a, b = tied["results"]["manual_ste"], tied["results"]["nsvq"]
    assert np.abs(a["W"] - b["W"]).max() < 1e-9                      # tied: one trajectory
    a, b = untied["results"]["manual_ste"], untied["results"]["nsvq"]
    assert np.abs(a["V"] - b["V"]).max() > 1e-6                      # untied: they separate
    assert untied["gradient_check"]["nsvq"]["gW_rel_err"] < 1e-6       # W and V checked


@pytest.mark.parametrize("symmetric", [1.0, 0.0])
def test_fsq_cells_codebook_and_gradients(symmetric):
    rng = np.random.default_rng(43)
    hp, D, m = vq.types.SimpleNamespace(K=40, m=3, symmetric=symmetric), 9, 3
    levels = [4, 3, 2]                                      # even and odd L, and L = 2
    X = rng.normal(size=(200, D)) * 2
    W = vq.stiefel_project(rng.normal(size=(m, D)))
    params = {"s": rng.uniform(0.5, 1.5, size=m), "a": rng.uniform(0.5, 2, size=m), "levels": np.array(levels, float)}
    T = vq.latents(X, W) * params["s"]
    L = np.array(levels, float)
    if symmetric:        # lucidrains symmetry_preserving_bound, from its formula
        values = 2 / (L - 1) * np.floor((L - 1) * (np.tanh(T) + 1) / 2 + 0.5) - 1
    else:                # lucidrains bound: round(tanh(t + shift) half_l - offset) / (L // 2)
        half_l, offset = (L - 1) * 1.001 / 2, np.where(L % 2 == 0, 0.5, 0.0)
        values = np.round(np.tanh(T + np.arctanh(offset / half_l)) * half_l - offset) / (L // 2)
    forward = params["a"] * values                          # what FSQ outputs
    E = vq.fsq_codebook(params["a"], levels, symmetric)
    assert E.shape == (24, m) and len(np.unique(forward, axis=0)) <= 24
    cells = vq.fsq_assign(vq.latents(X, W), params["s"], levels, symmetric)
    assert np.allclose(E[cells], forward, rtol=0, atol=1e-12)    # its cells, its codes (two formulas)
    grid = np.unique(E[:, 2] / params["a"][2])              # the two-level dimension
    assert np.allclose(grid, [-1, 1] if symmetric else [-1, 0])    # symmetric: +-1; the paper's: {-1, 0}
    for V in (None, W + 0.2 * rng.normal(size=W.shape)):
        delta = vq.fsq_freeze(W, V, params, X, hp)
        st = vq.fsq_grads(W, V, params, X, delta, hp)
        f = lambda W_=W, V_=V, **p: vq.fsq_loss(W_, V_, {**params, **p}, X, delta, hp)
        assert st.loss == pytest.approx(f(), rel=1e-12)     # the forward value is the loss
        assert vq.rel_err(_fd(lambda W_: f(W_=W_), W, 1e-6), st.gW) < 1e-6
        assert vq.rel_err(_fd(lambda s_: f(s=s_), params["s"], 1e-6), st.grads["s"]) < 1e-6
        assert vq.rel_err(_fd(lambda a_: f(a=a_), params["a"], 1e-6), st.grads["a"]) < 1e-6
        if V is not None:
            assert vq.rel_err(_fd(lambda V_: f(V_=V_), V, 1e-6), st.gV) < 1e-6
    assert vq.fsq_levels(8, 4) is None                      # fewer codes than 2^m: refused


def test_fsq_levels_are_the_best_allotment_by_variance():
    var = np.array([0.5, 3.0, 1.0])
    for K in (8, 20, 64, 100):
        levels = vq.fsq_levels(K, 3, var)
        assert math.prod(levels) <= K and min(levels) >= 2
        cost = lambda Ls: sum(v * vq.lloyd_max(L) for v, L in zip(var, Ls))
        every = [Ls for Ls in itertools.product(range(2, K // 4 + 1), repeat=3) if math.prod(Ls) <= K]
        assert cost(levels) == pytest.approx(min(cost(Ls) for Ls in every), rel=1e-12)   # by brute force
        assert levels[1] == max(levels)                      # the most levels to the largest variance


def test_fsq_with_symmetric_levels_on_the_default_problem():
    out = vq.run_comparison(K=64, methods=["fsq"], n_pop=50_000, n_init=1, kmeans_iter=2)   # FSQ: no codebook
    r, bound = out["results"]["fsq"], out["bounds"]["rank_m_bound"]
    assert r["pop_recon_mse"] <= 1.55 * bound                # was 1.93 x with the paper's bound at L = 2
    assert r["dead_frac"] == 0                               # every one of its 64 cells in use


def test_fsq_runs_and_is_scored_with_its_own_cells():
    out = vq.run_comparison(**{**TINY, "methods": ["fsq"], "n_pop": 5000})
    r = out["results"]["fsq"]
    assert r["status"] == "ok" and "levels" in r["note"]
    assert out["gradient_check"]["fsq"]["gW_rel_err"] < 1e-6            # W, s and a
    assert out["methods"]["fsq"]["paper"].startswith("Mentzer")         # the registry, in the summary
    X = vq.make_problem(vq.make_config(**TINY)).X_eval
    Z = vq.latents(X, r["W"])
    direct = np.mean(np.sum((X - r["E"][r["assign"](Z)] @ r["W"]) ** 2, axis=1))
    assert r["recon_mse"] == pytest.approx(direct, rel=1e-12)


def test_affine_alternating_optimisation_with_no_inner_step_is_the_plain_method():
    settings = {**TINY, "beta": 0.0, "methods": ["affine_ste"], "start": "random_codes"}
    plain = vq.run_comparison(**settings)["results"]["affine_ste"]
    same = vq.run_comparison(**settings, affine_ste_alternate=1.0, affine_ste_inner_lr=0.0)["results"]["affine_ste"]
    moved = vq.run_comparison(**settings, affine_ste_alternate=1.0)["results"]["affine_ste"]
    # another code path (the codes' step taken at rate 0, the codebook rebuilt): a tolerance
    for k in ("E", "W"):
        assert np.abs(plain[k] - same[k]).max() <= 1e-12 * np.abs(plain[k]).max()
    assert not np.allclose(plain["E"], moved["E"])


def test_new_methods_are_opt_in_and_checked_when_run():
    new = ("rotation_unit", "nsvq", "diveq", "affine_ste", "simvq", "wasserstein")
    assert not set(new) & set(vq.default_methods())
    out = vq.run_comparison(**{**TINY, "methods": list(new), "dead_threshold": 1.0})
    for name in new:                                        # every method's gradients checked
        assert out["results"][name]["status"] == "ok"
        chk = out["gradient_check"][name]
        assert chk["gW_rel_err"] < 1e-6 and chk["params_rel_err"] < 1e-6 and chk["loss_rel_err"] < 1e-12


def test_the_checker_catches_a_wrong_gradient_and_a_wrong_forward_value(monkeypatch):
    # two methods with a known defect each, registered as a user would, through the
    # module's own checker: it must fail them where it passes the correct ones
    p = small_problem()
    Xb = p.X_train[:64]
    ste = vq.METHODS["manual_ste"]

    def per_cluster_mean(W, V, params, X, frozen, hp):   # the original framework's codebook step:
        st = ste.loss_and_grads(W, V, params, X, frozen, hp)   # 2 (e_j - mean z), K times too large
        counts = np.bincount(frozen.labels, minlength=len(params["E"]))
        return st._replace(grads={"E": st.grads["E"] * len(X) / (hp.alpha * np.maximum(counts, 1))[:, None]})

    def inverted(W, V, params, X, hp, rng):               # its later rotation scale ||z|| / ||q||
        fr = vq.METHODS["rotation"].freeze(W, V, params, X, hp, rng)
        return fr._replace(lam=1.0 / fr.lam)
    monkeypatch.setitem(vq.METHODS, "mean_step", vq.dataclasses.replace(ste, loss_and_grads=per_cluster_mean))
    monkeypatch.setitem(vq.METHODS, "inverted", vq.dataclasses.replace(vq.METHODS["rotation"], freeze=inverted))
    hp = vq.hyperparameters(p.cfg, "manual_ste")
    for name, bad in (("manual_ste", False), ("rotation", False), ("mean_step", True), ("inverted", True)):
        chk = vq.gradient_errors(vq.METHODS[name], hp, p.W0, None, {"E": p.E0}, Xb)
        worst = max(chk["gW_rel_err"], chk["params_rel_err"], chk["loss_rel_err"])
        assert (worst > 1e-3) == bad, (name, chk)
    out = vq.compare(vq.make_problem(vq.make_config(**{**TINY, "methods": ["manual_ste", "mean_step"]})))
    assert out["gradient_check"]["mean_step"]["params_rel_err"] > 0.5       # in every report too
    assert out["gradient_check"]["manual_ste"]["params_rel_err"] < 1e-6


def test_surrogate_forward_value_is_the_true_loss():
    rng = np.random.default_rng(4)
    for estimator in ("ste", "rotation"):
        W, E, X = random_point(rng, 80, 9, 3, 6)
        fr = vq.freeze(W, E, X, estimator)
        true = true_loss(W, E, X, 0.7, 0.3)
        assert vq.surrogate_loss(W, E, X, fr, 0.7, 0.3) == pytest.approx(true, rel=1e-13)


def test_sufficient_statistics_evaluate_the_same_surrogate():
    rng = np.random.default_rng(5)
    W, E, X = random_point(rng, 70, 8, 3, 5)
    fr = vq.freeze(W, E, X, "ste")
    st = vq.ste_stats(X, fr, E.shape[0])
    for _ in range(5):                                    # away from the freeze point too
        W2 = W + 0.3 * rng.normal(size=W.shape)
        E2 = E + 0.3 * rng.normal(size=E.shape)
        a = vq.surrogate_loss(W2, E2, X, fr, 1.3, 0.4)
        b = vq.ste_surrogate(W2, E2, st, 1.3, 0.4)
        assert b == pytest.approx(a, rel=1e-12)
    idx = np.arange(W.size)                               # stacks: one entry of W moved at a time
    for delta in (0.7, -0.05):
        stack = np.repeat(W[None], W.size, axis=0).reshape(W.size, -1)
        stack[idx, idx] += delta
        stack = stack.reshape((-1,) + W.shape)
        direct = vq.surrogate_loss(stack, E, X, fr, 1.3, 0.4)
        assert np.allclose(vq.ste_surrogate(stack, E, st, 1.3, 0.4), direct, rtol=1e-12, atol=0)
    Es = E + 0.2 * rng.normal(size=(4,) + E.shape)        # and stacks of codebooks
    assert np.allclose(vq.ste_surrogate(W, Es, st, 1.3, 0.4), vq.surrogate_loss(W, Es, X, fr, 1.3, 0.4),
                       rtol=1e-12, atol=0)


def test_rotation_maps_z_onto_q_with_an_orthogonal_matrix():
    rng = np.random.default_rng(6)
    W, E, X = random_point(rng, 50, 7, 4, 6)
    fr = vq.freeze(W, E, X, "rotation")
    assert fr.n_fallback == 0
    M = vq.rotation_matrices(fr)                          # lam R per sample
    R = M / fr.lam[:, None, None]
    z_hat = fr.Z0 / np.linalg.norm(fr.Z0, axis=1, keepdims=True)
    q_hat = fr.Q0 / np.linalg.norm(fr.Q0, axis=1, keepdims=True)
    assert np.allclose(np.einsum("bij,bj->bi", R, z_hat), q_hat, atol=1e-12)
    assert np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(4), atol=1e-12)
    assert np.allclose(np.einsum("bij,bj->bi", M, fr.Z0), fr.Q0, atol=1e-12)


def test_rotation_falls_back_to_ste_on_degenerate_samples():
    W = np.eye(2, 3)
    E = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    X = np.array([[0.0, 0.0, 1.0],     # z = 0
                  [-0.2, 0.0, 0.0],    # nearest code [-1, 0]... or 0: z = (-0.2, 0) -> q = 0
                  [0.8, 0.1, 0.5],     # regular
                  [-0.9, 0.0, 0.3]])   # q_hat = z_hat: regular (no rotation needed)
    fr = vq.freeze(W, E, X, "rotation")
    assert fr.n_fallback == 2
    assert vq.surrogate_loss(W, E, X, fr, 1.0, 0.5) == pytest.approx(
        true_loss(W, E, X, 1.0, 0.5), rel=1e-13)
    man = vq.manual_grads(W, E, X, 1.0, 0.5, "rotation")
    fd = vq.fd_grads(W, E, X, 1.0, 0.5, "rotation")
    assert vq.rel_err(fd.gW, man.gW) < 1e-6 and vq.rel_err(fd.gE, man.gE) < 1e-6


# ---------------------------------------------------------------- reconstruction identity

def test_reconstruction_error_splits_into_residual_and_distortion():
    rng = np.random.default_rng(8)
    W, E, X = random_point(rng, 500, 12, 4, 9)
    Z = X @ W.T
    Q = E[vq.assign(Z, E)]
    per_sample = np.sum((X - Q @ W) ** 2, axis=1)
    residual = np.sum((X - Z @ W) ** 2, axis=1)
    distortion = np.sum((Z - Q) ** 2, axis=1)
    assert np.allclose(per_sample, residual + distortion, rtol=1e-12, atol=1e-12)
    m = vq.metrics(W, E, X)
    assert m["recon_mse"] == pytest.approx(residual.mean() + m["in_sub_dist"], rel=1e-12)
    assert m["recon_mse"] == pytest.approx(per_sample.mean(), rel=1e-12)
    fast = vq.metrics(W, E, X, x_sq=np.sum(X * X, axis=1))   # the squared norms, precomputed
    assert fast["recon_mse"] == pytest.approx(m["recon_mse"], rel=1e-12)
    shifted = vq.metrics(W, E, X, x_sq=np.sum(X * X, axis=1) + 1)   # it uses x_sq
    assert shifted["recon_mse"] == pytest.approx(m["recon_mse"] + 1, rel=1e-12)
    # the error identity holds for any W, orthonormal rows or not (cancellation: 1e-12)
    V = 0.7 * rng.normal(size=W.shape)
    direct = np.mean(np.sum((X - E[vq.assign(X @ V.T, E)] @ V) ** 2, axis=1))
    assert vq.metrics(V, E, X)["recon_mse"] == pytest.approx(direct, rel=1e-12)
    assert {k: v for k, v in fast.items() if k != "recon_mse"} == \
        {k: v for k, v in m.items() if k != "recon_mse"}


# ---------------------------------------------------------------- k-means

def test_lloyd_by_hand_exact_centres_and_inertia():
    Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [10.0, 2.0]])
    r = vq.lloyd(Z, np.array([[0.0, 3.0], [7.0, 0.0]]), max_iter=10)
    # first assignment: (0,0),(0,1) -> 0 and the rest -> 1; means (0, .5), (10, 1): sums of
    # small integers divided by 2 and 3; compared to the hand result within a few ulps (the
    # sums' order is the implementation's); the labels are integers: equal or wrong
    np.testing.assert_allclose(r.E, [[0.0, 0.5], [10.0, 1.0]], rtol=4 * np.finfo(float).eps, atol=0)
    assert r.labels.tolist() == [0, 0, 1, 1, 1]
    assert r.inertia == pytest.approx(0.25 + 0.25 + 1.0 + 0.0 + 1.0, rel=1e-14)


def test_kmeans_by_hand():
    Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    r = vq.kmeans(Z, 2, seed=3, n_init=3)
    # means of two small integers each: within a few ulps of the hand result, whatever the
    # order of the sums (a tolerance scaled to the largest coordinate, 10)
    np.testing.assert_allclose(r.E[np.argsort(r.E[:, 0])], [[0.0, 0.5], [10.0, 0.5]],
                               rtol=0, atol=40 * np.finfo(float).eps)
    assert r.inertia == pytest.approx(1.0, rel=1e-14)


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    Z = np.array([[0.0], [1.0], [2.0], [10.0]])
    E, labels = vq.lloyd(Z, np.array([[1.0], [100.0]]), max_iter=10)[:2]
    # all points first go to centre 0; code 1 is empty and takes x = 10, the farthest
    assert np.array_equal(E, [[1.0], [10.0]])
    assert np.array_equal(labels, [0, 0, 0, 1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lloyd_is_never_worse_than_its_start_and_equals_plain_lloyd(dtype):
    rng = np.random.default_rng(9)
    for trial in range(9):
        n, m, K = [(500, 2, 5), (2000, 4, 32), (3000, 8, 64)][trial % 3]
        Z = (rng.normal(size=(n, m)) * rng.uniform(0.5, 2, size=m)).astype(dtype)
        E0 = (rng.normal(size=(K, m)) * 2).astype(dtype)
        start = vq.nearest(Z, E0)[1].sum()
        r = vq.lloyd(Z, E0, max_iter=300)
        p = vq.lloyd_plain(Z, E0, max_iter=300)
        assert r.inertia <= start
        # the bounds skip work, never change it: the same centres, bit for bit
        assert np.array_equal(r.labels, p.labels) and np.array_equal(r.E, p.E)
        assert r.E.dtype == dtype and r.n_iter == p.n_iter
        assert r.inertia == pytest.approx(p.inertia, rel=1e-12)


def test_kmeans_bad_K_is_a_clear_error():
    with pytest.raises(ValueError, match="n_samples=3 should be >= K=5"):
        vq.kmeans(np.zeros((3, 2)), 5)


def test_assignment_in_chunks_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(10)
    Z, E = rng.normal(size=(3001, 3)), rng.normal(size=(17, 3))
    monkeypatch.setattr(vq, "_PRODUCT", 17 * 3 * 100)     # force many blocks
    labels, dist, dist2 = vq.nearest(Z, E, second=True)
    D2 = ((Z[:, None, :] - E[None]) ** 2).sum(-1)
    # two formulas for a distance: a label may differ only where two codes tie to rounding
    tie = D2[np.arange(len(Z)), labels] - D2.min(1) <= 1e-12 * D2.max()
    assert tie.all() and (labels == D2.argmin(1)).mean() > 0.999
    assert np.allclose(dist, D2.min(1), atol=1e-12)
    assert np.allclose(dist2, np.sort(D2, axis=1)[:, 1], atol=1e-12)
    pp = vq.kmeans_plusplus(Z, 17, np.random.default_rng(1))  # blocked candidate distances
    monkeypatch.setattr(vq, "_PRODUCT", 1 << 18)
    assert np.array_equal(pp, vq.kmeans_plusplus(Z, 17, np.random.default_rng(1)))


# ---------------------------------------------------------------- methods

def test_fd_ste_follows_manual_ste():
    out = vq.run_comparison(**{**TINY, "steps": 40, "methods": ["fd_ste", "manual_ste"]})
    a, b = out["results"]["fd_ste"], out["results"]["manual_ste"]
    for k in vq._METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
    assert np.abs(a["W"] - b["W"]).max() < 1e-7
    assert out["fd_vs_manual"]["max_rel_metric_diff"] < 1e-6


@pytest.mark.parametrize("optimizer", vq.OPTIMIZERS)
def test_W_keeps_orthonormal_rows_after_every_step(monkeypatch, optimizer):
    worst = []
    step = vq.Optimizer.step

    def checked(self, name, p, g, factor=1.0):
        new = step(self, name, p, g, factor)
        if name == "W":
            worst.append(np.abs(new @ new.T - np.eye(new.shape[0])).max())
        return new
    monkeypatch.setattr(vq.Optimizer, "step", checked)
    lr = {"lrE": 0.01, "lrW": 0.01} if optimizer.startswith("adam") else {}
    vq.run_comparison(**{**TINY, "methods": ["manual_ste", "rotation", "ema_ste"], "optimizer": optimizer, **lr})
    assert len(worst) == 3 * TINY["steps"]
    assert max(worst) < 1e-10


def test_procrustes_lloyd_never_increases_the_training_error():
    X, _, _ = vq.make_lowrank_data(20, 5, 2000, 10, seed=3)
    W0 = vq.pca_encoder(X, 3)
    E0 = vq.kmeans(X @ W0.T, 16, seed=1, n_init=1, max_iter=5).E   # a poor start
    W, E, hist = vq.procrustes_lloyd(X, W0, E0, max_rounds=200, tol=0)
    assert len(hist) > 5
    assert np.all(np.diff(hist) <= 1e-12 * hist[0])
    assert hist[-1] < hist[0]
    assert np.abs(W @ W.T - np.eye(3)).max() < 1e-12
    m = vq.metrics(W, E, X)                                # the logged error is the real one
    assert m["recon_mse"] == pytest.approx(hist[-1], rel=1e-10)


def _procrustes_lloyd_plain(X, W, E, max_rounds, tol):
    """procrustes_lloyd as its docstring states it: the cluster sums recomputed and every
    point reassigned every round."""
    n, K = X.shape[0], E.shape[0]
    Z = X @ W.T
    labels, dist = vq.nearest(Z, E)
    hist = [(np.sum(X * X) - np.sum(Z * Z) + dist.sum()) / n]
    for _ in range(max_rounds):
        counts = np.bincount(labels, minlength=K)
        S = np.zeros((K, X.shape[1]))
        np.add.at(S, labels, X)
        W = vq.stiefel_project(E.astype(np.float64).T @ S).astype(X.dtype)
        Z = X @ W.T
        has = counts > 0
        E = E.astype(np.float64)
        E[has] = (S[has] @ W.T.astype(np.float64)) / counts[has, None]
        E = E.astype(X.dtype)
        labels, dist = vq.nearest(Z, E)
        hist.append((np.sum(X * X) - np.sum(Z * Z) + dist.sum()) / n)
        if hist[-2] - hist[-1] <= tol * hist[-2]:
            break
    return W, E, hist


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_procrustes_lloyd_bounds_and_running_sums_change_nothing(dtype):
    # only points whose bound has expired are searched again and the sums follow the
    # points that move; the trajectory is that of full passes (the sums are float64, the
    # own distances computed directly: rounding far below the tolerance)
    for seed, (D, r, m, K, n) in enumerate([(20, 5, 3, 16, 2000), (64, 6, 4, 32, 3000),
                                            (30, 8, 2, 50, 2000)]):
        X = vq.make_lowrank_data(D, r, n, 10, seed=seed)[0].astype(dtype)
        W0 = vq.pca_encoder(X, m)
        E0 = vq.kmeans(X @ W0.T, K, seed=1, n_init=1, max_iter=5).E.astype(dtype)   # a poor start
        W, E, hist = vq.procrustes_lloyd(X, W0, E0, max_rounds=60, tol=-1.0)   # never stops early
        Wp, Ep, histp = _procrustes_lloyd_plain(X, W0, E0, 60, -1.0)
        assert len(hist) == len(histp) == 61
        tol = 1e-10 if dtype == np.float64 else 1e-4
        assert np.abs(W - Wp).max() <= tol and np.abs(E - Ep).max() <= tol * np.abs(Ep).max()
        lab, d1, d2 = vq.nearest(X @ W.T, E, second=True)  # the two models differ by tol at most:
        moved = lab != vq.assign(X @ Wp.T, Ep)               # a label may differ at a near-tie only
        assert np.all(d2[moved] - d1[moved] <= 100 * tol * (1 + d2[moved]))
        assert np.allclose(hist, histp, rtol=tol)


def test_ema_codebook_converges_to_cluster_means():
    rng = np.random.default_rng(11)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    Z = np.concatenate([c + 0.3 * rng.normal(size=(40, 2)) for c in centres])
    labels = np.repeat([0, 1, 2], 40)
    means = np.array([Z[labels == j].mean(0) for j in range(3)])
    E = centres + 1.0                                       # start away from the means
    hp = vq.types.SimpleNamespace(ema_decay=0.9, ema_eps=0.0)
    for eps, E, tol in ((0.0, centres + 1.0, 1e-12), (1e-5, centres.copy(), 1e-5)):   # smoothing: O(eps)
        hp.ema_eps = eps
        params = {"E": E, "counts": np.zeros(3), "sums": np.zeros((3, 2)), "t": 0}
        for _ in range(300):
            fr = vq.types.SimpleNamespace(Z0=Z, labels=vq.assign(Z, params["E"]))
            params, _ = vq.ema_update(params, fr, hp)
        assert np.allclose(params["E"], means, rtol=tol, atol=tol) and params["t"] == 300


@pytest.fixture
def blank_plots(monkeypatch):
    """For tests of what a run writes, not of its plots: the PNGs are written, blank
    (drawing the real ones takes most of a tiny run's time; other tests look at them)."""
    def blank(summary):
        return vq._figure(1, 1)[0]
    monkeypatch.setattr(vq, "plot_comparison", blank)
    monkeypatch.setattr(vq, "plot_training_curves", blank)


@pytest.fixture
def blank_sweep_plots(monkeypatch):
    """The same for sweeps.py's figures, in this process (a sweep run as a subprocess
    draws its real ones)."""
    def blank(*args, **kwargs):
        return vq._figure(1, 1)[0]
    for name in ("plot_sweep", "plot_tricks", "plot_fang", "plot_tuning"):
        monkeypatch.setattr(sweeps, name, blank)


def small_problem(**settings):
    """A problem of TINY's data with the given settings (start point computed here)."""
    return vq.make_problem(vq.make_config(**{**TINY, **settings}))


def test_a_dead_code_is_reseeded_when_its_average_count_falls_below_the_threshold(monkeypatch):
    # the codes of a converged k-means all serve many points of every batch; a far one
    # serves none: its average count 0.8^t (decay 0.8, from 1) falls below 0.5 at step 4
    # exactly, and it then takes a latent of that step's batch (reset to the threshold,
    # it dies again after a batch without hits: lucidrains' rule)
    p = small_problem(dead_threshold=0.5, steps=6, train_encoder=0)
    p.E0 = p.E0.copy()
    far = int(np.argmax(np.linalg.norm(p.E0, axis=1)))
    p.E0[far] = 1e3
    seen = []

    def reset(params, codes, values, hp):                   # the plain rule, watched
        seen.append(codes)
        return vq.reset_codes(params, codes, values, hp)
    still = vq.dataclasses.replace(vq.METHODS["manual_ste"], reset=reset, loss_and_grads=lambda W, V, params, *_: vq.Step(
        0.0, np.zeros_like(W), None, {"E": np.zeros_like(params["E"])}))   # no step: only re-seeding moves a code
    monkeypatch.setitem(vq.METHODS, "still", still)
    res = vq.train(p, "still")
    assert res.logs["reseeded"][:4] == [0, 0, 0, 1]
    assert all(list(codes) == [far] for codes in seen) and len(seen) == sum(res.logs["reseeded"])
    Z = vq.latents(p.X_train, p.W0)
    assert np.any(np.all(Z == res.E[far], axis=1))          # a latent of the training data
    assert np.array_equal(np.delete(res.E, far, 0), np.delete(p.E0, far, 0))
    assert f"{len(seen)} codes re-seeded" in res.note


def test_reseeding_restores_the_codes_of_a_shifted_start():
    settings = dict(start="shifted", shift=6.0, train_encoder=0, steps=40, log_every=10,
                    methods=["manual_ste", "ema_ste"])
    plain = vq.run_comparison(**{**TINY, **settings})
    reseeded = vq.run_comparison(**{**TINY, **settings, "dead_threshold": 1.0})
    for name in ("manual_ste", "ema_ste"):
        a, b = plain["results"][name], reseeded["results"][name]
        assert sum(b["logs"]["reseeded"]) > 0 and "reseeded" not in a["note"]
        assert b["dead_frac"] < a["dead_frac"] and b["pop_recon_mse"] < a["pop_recon_mse"]


def test_start_regimes_are_drawn_as_documented():
    base = small_problem()
    assert base.W0 is base.W_pca and base.E0 is base.E_kmeans         # kmeans: pca_lloyd's model
    rc, sh = small_problem(start="random_codes"), small_problem(start="shifted", shift=2.5)
    s = vq.latents(base.X_train, base.W_pca).std(axis=0)
    assert np.array_equal(rc.W0, base.W_pca) and np.array_equal(sh.W0, base.W_pca)
    assert np.allclose(sh.E0 - rc.E0, 2.5 * s, rtol=1e-12, atol=1e-12)   # same draws, offset
    wide = small_problem(start="random_codes", K=400)                      # 400 draws per coordinate:
    assert abs(np.log(wide.E0.std(axis=0) / s)).max() < 0.25               # the latents' scale (sd 4%)
    rnd = small_problem(start="random")
    assert np.abs(rnd.W0 @ rnd.W0.T - np.eye(TINY["m"])).max() < 1e-12
    assert vq.subspace_angle_deg(rnd.W0, base.U[:, :TINY["m"]]) > 5     # not the PCA encoder
    out = vq.run_comparison(**{**TINY, "start": "random", "steps": 5,
                               "methods": ["pca_lloyd", "manual_ste"]})
    ref = vq.run_comparison(**{**TINY, "steps": 5, "methods": ["pca_lloyd", "manual_ste"]})
    assert out["results"]["pca_lloyd"]["pop_recon_mse"] == ref["results"]["pca_lloyd"]["pop_recon_mse"]
    assert out["results"]["manual_ste"]["pop_recon_mse"] != ref["results"]["manual_ste"]["pop_recon_mse"]


def test_codebook_only_training_keeps_every_encoder_at_its_start():
    out = vq.run_comparison(**{**TINY, "start": "random_codes", "train_encoder": 0,
                               "methods": ["manual_ste", "rotation", "ema_ste", "procrustes_lloyd"]})
    W0 = small_problem(start="random_codes").W0
    for name, r in out["results"].items():
        assert np.array_equal(r["W"], W0), name
        assert not np.array_equal(r["E"], small_problem(start="random_codes").E0), name


def test_learning_rate_schedules_and_tail_averaging():
    cfg = vq.make_config(**{**TINY, "steps": 10})
    for name, first, mid in (("constant", 1, 1), ("cosine", 1, 0.5), ("linear", 1, 0.5)):
        c = vq.dataclasses.replace(cfg, lr_schedule=name)
        assert vq.lr_factor(c, 1) == first and vq.lr_factor(c, 6) == pytest.approx(mid, abs=1e-15)
        assert all(vq.lr_factor(c, t) >= vq.lr_factor(c, t + 1) > 0 for t in range(1, 10))
    # a decaying rate moves the codes less than the constant one from the same start
    runs = {s: vq.run_comparison(**{**TINY, "lr_schedule": s, "methods": ["manual_ste"]})
            for s in ("constant", "cosine")}
    moved = {s: np.abs(r["results"]["manual_ste"]["E"] - small_problem().E0).sum() for s, r in runs.items()}
    assert moved["cosine"] < moved["constant"]
    # tail averaging reports the mean of the last iterates (constant rate: a run of t
    # steps is the first t steps of a longer one)
    avg = vq.run_comparison(**{**TINY, "tail_average": 0.2, "methods": ["manual_ste"]})["results"]["manual_ste"]
    last = [vq.run_comparison(**{**TINY, "steps": t, "methods": ["manual_ste"]})["results"]["manual_ste"]
            for t in (13, 14, 15)]
    assert np.allclose(avg["E"], np.mean([r["E"] for r in last], axis=0), rtol=0, atol=1e-12)
    assert np.allclose(avg["W"], vq.stiefel_project(np.mean([r["W"] for r in last], axis=0)), atol=1e-12)


# ---------------------------------------------------------------- theory lines

@pytest.mark.parametrize("K,max_1960", [(2, 0.3634), (4, 0.1175), (8, 0.03455), (16, 0.009501)])
def test_pca_lloyd_reproduces_the_lloyd_max_quantizer_of_the_unit_gaussian(K, max_1960):
    # Max (1960), Table I: the optimal K-level quantizer of N(0, 1); k-means on 40,000
    # samples lands on it, within 3 standard errors of the population estimate
    out = vq.run_comparison(D=1, rank=1, m=1, lmax=1, lmin=1, K=K, n_train=40000, n_eval=1000,
                            steps=0, n_pop=400_000, n_init=2, kmeans_iter=1000,
                            methods=["pca_lloyd"], outdir=None, quiet=True, workers=1)
    r = out["results"]["pca_lloyd"]
    assert abs(r["pop_recon_mse"] - max_1960) <= 3 * r["pop_recon_se"] + 5e-5 * max_1960  # table's digits
    half_ulp = 0.5 * 10 ** (math.floor(math.log10(max_1960)) - 3)        # the table's four digits
    assert abs(vq.lloyd_max(K) - max_1960) <= half_ulp                      # FSQ's reference, by quadrature


def test_rank_m_bound_closed_forms():
    lam = np.geomspace(4, 0.25, 6)
    assert vq.rank_m_bound(lam, 4, K=32) == pytest.approx(1.91642, abs=5e-6)
    assert vq.rank_m_bound(lam, 4, K=64) == pytest.approx(1.555826, abs=5e-7)
    assert vq.shannon_bound(lam, 64) == pytest.approx(1.5, rel=1e-12)
    # m = rank: nothing outside the subspace, the full-spectrum bound
    assert vq.rank_m_bound(lam, 6, K=32) == pytest.approx(vq.shannon_bound(lam, 32), rel=1e-12)
    assert vq.rank_m_bound(lam, 4, bits=5.0) == vq.rank_m_bound(lam, 4, K=32)
    # Zador: m = 2, hexagonal lattice, det^(1/2) = sqrt(l1 l2)
    z = vq.zador_approximation([4.0, 1.0, 0.5], 2, 64)
    assert z == pytest.approx(0.5 + 2 * 0.080188 * 2 * math.pi * 2 ** 2 * 2.0 / 64, rel=1e-12)
    assert vq.zador_approximation(lam, 9, 32) is None       # no lattice tabulated for m = 9


@settings(max_examples=60, deadline=None)
@given(lam=st.lists(st.floats(0.01, 10), min_size=1, max_size=8), K=st.integers(1, 300),
       m_frac=st.floats(0, 1))
def test_property_rank_m_bound_lies_between_the_full_bound_and_the_error(lam, K, m_frac):
    m = max(1, round(m_frac * len(lam)))
    b = vq.rank_m_bound(lam, m, K=K)
    assert b >= vq.shannon_bound(lam, K) * (1 - 1e-12)       # the rank restriction only adds
    assert b >= vq.pca_floor(lam, m) * (1 - 1e-12)
    assert vq.rank_m_bound(lam, m, K=K + 1) <= b * (1 + 1e-12)   # more codes, lower bound


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), K=st.integers(2, 12), shape=st.sampled_from([(6, 3, 2), (5, 5, 3), (8, 2, 1)]),
       start=st.sampled_from(vq.START_REGIMES))
def test_property_no_method_scores_below_the_rank_m_bound(seed, K, shape, start):
    D, rank, m = shape
    out = vq.run_comparison(D=D, rank=rank, m=m, K=K, n_train=400, n_eval=200, steps=8, batch=64,
                            n_pop=20000, n_init=2, seed=seed, start=start, outdir=None, quiet=True,
                            workers=1, methods=["pca_lloyd", "manual_ste", "rotation", "ema_ste",
                                                "procrustes_lloyd"])
    b = out["bounds"]["rank_m_bound"]
    for name, r in out["results"].items():
        if r["status"] == "ok":
            assert r["pop_recon_mse"] > b, name
            assert r["entropy_bound"] >= b * (1 - 1e-12), name   # entropy <= log2 K bits


# ---------------------------------------------------------------- floors and population

def test_shannon_bound_closed_forms():
    assert vq.shannon_bound([3.0], 8) == pytest.approx(3.0 / 64, rel=1e-12)
    # two active components: theta = sqrt(l1 l2) / K, D = 2 theta
    assert vq.shannon_bound([4.0, 1.0], 8) == pytest.approx(2 * 2.0 / 8, rel=1e-12)
    # one inactive: l2 = 0.01 below theta = l1 / K^2 = 0.0625
    assert vq.shannon_bound([4.0, 0.01], 8) == pytest.approx(0.0625 + 0.01, rel=1e-12)
    lam = np.geomspace(4, 0.25, 6)
    vals = [vq.shannon_bound(lam, K) for K in (1, 2, 8, 32, 128)]
    assert vals[0] == pytest.approx(lam.sum()) and all(np.diff(vals) < 0)


def test_population_errors_match_a_direct_computation():
    rng = np.random.default_rng(13)
    D, rank, m, K = 10, 4, 3, 6
    U, lam = vq.lowrank_factor(D, rank, seed=2)
    W = vq.stiefel_project(rng.normal(size=(m, D)))
    E = rng.normal(size=(K, m))
    C = rng.normal(size=(K, rank))
    g = np.random.default_rng(5)
    pop = vq.population_errors({"vq": (W, E), "uncon": C}, U, lambda a, c: g.standard_normal((c, rank)) * np.sqrt(lam),
                               5000, chunk=777)
    S = np.random.default_rng(5).standard_normal((5000, rank)) * np.sqrt(lam)
    X = S @ U.T
    err_vq = np.sum((X - E[vq.assign(X @ W.T, E)] @ W) ** 2, axis=1)
    err_c = np.min(((X[:, None, :] - (C @ U.T)[None]) ** 2).sum(-1), axis=1)
    assert pop.mean == pytest.approx([err_vq.mean(), err_c.mean()], rel=1e-12)
    assert pop.se[0] == pytest.approx(err_vq.std(ddof=1) / math.sqrt(5000), rel=1e-9)
    assert pop.diff_se("vq", "uncon") == pytest.approx((err_vq - err_c).std(ddof=1) / math.sqrt(5000), rel=1e-9)


def test_default_population_sample_is_precise_enough():
    cfg = vq.Config()
    out = vq.run_comparison(**{**TINY, "D": cfg.D, "rank": cfg.rank, "m": cfg.m, "K": cfg.K,
                               "n_pop": cfg.n_pop, "methods": ["pca_lloyd"]})
    r = out["results"]["pca_lloyd"]
    assert r["pop_recon_se"] < 1e-3 * r["pop_recon_mse"]


def test_every_method_sits_above_both_floors():
    out = vq.run_comparison(**TINY)
    b = out["bounds"]
    for name, r in out["results"].items():
        assert r["status"] == "ok", name
        assert r["pop_recon_mse"] > b["shannon_bound"] and r["pop_recon_mse"] > b["pca_floor"]
    assert b["unconstrained_kmeans"] > b["shannon_bound"]
    assert 0 <= out["results"]["pca_lloyd"]["subspace_angle_deg"] < 90


# ---------------------------------------------------------------- runs, outputs, CLI

def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if "seconds" not in k}
    return obj


def test_same_settings_give_the_same_summary(tmp_path, monkeypatch):
    import matplotlib
    a, b, backend = tmp_path / "a", tmp_path / "b", matplotlib.rcParams["backend"]
    vq.run_comparison(**{**TINY, "outdir": str(a)})
    assert matplotlib.rcParams["backend"] == backend        # plots drawn without touching the user's
    monkeypatch.setattr(vq, "save_figure", lambda fig, path: None)   # the numbers, not the plots
    vq.run_comparison(**{**TINY, "outdir": str(b)})
    ja = json.loads((a / "summary.json").read_text())
    jb = json.loads((b / "summary.json").read_text())
    assert ja["config"].pop("outdir") != jb["config"].pop("outdir")
    assert _strip_times(ja) == _strip_times(jb)
    assert sorted(os.listdir(a)) == sorted(["summary.json", "comparison.png", "training_curves.png"]
                                           + [f"{m}_logs.json" for m in vq.default_methods()[1:]])
    assert list(ja["results"]) == list(vq.default_methods())
    for r in ja["results"].values():
        assert {"recon_mse", "in_sub_dist", "usage_entropy", "dead_frac", "perplexity",
                "seconds", "pop_recon_mse", "pop_recon_se", "subspace_angle_deg"} <= set(r)
    logs = json.loads((a / "procrustes_lloyd_logs.json").read_text())
    assert np.all(np.diff(logs["train_recon_mse"]) <= 1e-12)


def test_the_verdict_says_what_the_population_separates():
    out = vq.run_comparison(**{**TINY, "lrE": 5.0, "steps": 30})           # a harmful codebook step
    text = vq.format_report(out)
    pairs = out["bounds"]["pop_pairs"]
    for name, r in out["results"].items():
        if name == "pca_lloyd":
            continue
        d, se = pairs[name]["pca_lloyd"]
        assert d == pytest.approx(r["pop_diff_to_baseline"]) and se == pytest.approx(r["pop_diff_to_baseline_se"])
        assert pairs["pca_lloyd"][name][0] == -d                          # antisymmetric
    worse = vq.verdict(out).split("worse: ")[1].split(";")[0]            # the words, unwrapped
    base = out["results"]["pca_lloyd"]["pop_recon_mse"]
    for name, (d, se) in ((n, pairs[n]["pca_lloyd"]) for n in pairs if n != "pca_lloyd"):
        assert (vq.method_label(name) in worse) == (d > 2 * se and d >= 0.001 * base), name
    assert max(map(len, text.splitlines())) <= 100


def _verdict_of(pairs, errors, practical):
    """The verdict of a summary holding only these population pairs and errors."""
    mean = {k: v for k, v in errors.items()}
    best = min(mean, key=mean.get)
    return vq.verdict({"results": {k: {"pop_recon_mse": v} for k, v in mean.items()},
                       "config": {"practical": practical}, "bounds": {"pop_pairs": pairs, "best_method": best}})


def test_the_verdict_weighs_size_and_names_no_winner_it_cannot_separate():
    # hand-made pairs: a (0.05% below the baseline, 10 se), b (2% above, 10 se), c (tied)
    err = {"pca_lloyd": 1.0, "manual_ste": 0.9995, "rotation": 1.02, "ema_ste": 0.9996}
    d = {("manual_ste", "pca_lloyd"): (-0.0005, 0.00005), ("rotation", "pca_lloyd"): (0.02, 0.002),
         ("ema_ste", "pca_lloyd"): (-0.0004, 0.001), ("manual_ste", "rotation"): (-0.0205, 0.002),
         ("manual_ste", "ema_ste"): (-0.0001, 0.001), ("rotation", "ema_ste"): (0.0204, 0.002)}
    pairs = {}
    for (a, b), (diff, se) in d.items():
        pairs.setdefault(a, {})[b] = (diff, se)
        pairs.setdefault(b, {})[a] = (-diff, se)
    text = _verdict_of(pairs, err, 0.001)
    assert "better than PCA + Lloyd: none" in text and "worse: Rotation trick (+2.000%)" in text
    assert "not practically different: Manual STE (-0.050%)" in text      # separable, but under 0.1%
    assert "not separable from it: EMA STE" in text
    assert "No single lowest error: the lowest, Manual STE, is not separable from EMA STE" in text
    assert "Lowest error" not in text
    loose = _verdict_of(pairs, err, 0.0)                                   # no threshold: it is better
    assert "better than PCA + Lloyd: Manual STE (-0.050%)" in loose
    # Holm: six pairs; the smallest p first against 0.05/6, and so on; a pair at 2.05 se is
    # separable alone (p = 0.040) but not after five others
    assert "Of the 6 pairs, 4 are separable at two standard errors each, 4 with Holm's" in text
    items, sep = vq.holm({"a": {"b": (2.05, 1.0)}})
    assert sep == [("a", "b")]
    many = {f"m{i}": {"z": (2.05, 1.0)} for i in range(6)}
    assert vq.holm(many)[1] == []


def test_progress_lines_for_long_phases_and_silence_when_quiet(tmp_path, capsys, blank_plots):
    import io
    buf = io.StringIO()
    p = small_problem(steps=40)
    p.progress = vq.Progress(after=0, every=0, stream=buf)
    vq.train(p, "manual_ste")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 39 and "training manual_ste: 1 of 40" in lines[0] and "s left" in lines[0]
    assert "39 of 40" in lines[-1]
    silent = io.StringIO()
    p.progress = vq.Progress(enabled=False, after=0, every=0, stream=silent)
    vq.train(p, "manual_ste")
    assert silent.getvalue() == ""
    capsys.readouterr()
    assert vq.main(["--D", "8", "--rank", "3", "--m", "2", "--K", "4", "--n_train", "300", "--n_eval", "100",
                    "--steps", "3", "--batch", "32", "--n_pop", "1000", "--quiet", "--outdir",
                    str(tmp_path / "o"), "--workers", "1"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""


def test_memory_estimate_grows_with_the_data_and_refuses_what_cannot_fit(monkeypatch):
    small, big = vq.make_config(), vq.make_config(n_train=200000)
    assert vq.memory_estimate(big) - vq.memory_estimate(small) >= 8 * 180000 * 64   # the data alone
    monkeypatch.setattr(vq, "available_memory", lambda: 2 * vq.memory_estimate(small))
    vq.make_config()                                        # fits
    with pytest.raises(vq.ConfigError, match=r"needs about .* this machine has .* available"):
        vq.make_config(n_train=20000 + 2 * vq.memory_estimate(small) // (8 * 64))
    monkeypatch.setattr(vq, "available_memory", lambda: None)   # unknown: nothing refused
    vq.make_config(n_train=10 ** 7)


def test_available_memory_reads_this_machine():
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo: available_memory() is None here, tested above")
    assert 1 << 20 < vq.available_memory() < 1 << 50


def test_another_method_does_not_change_a_methods_numbers():
    one = vq.run_comparison(**{**TINY, "methods": ["manual_ste"]})
    two = vq.run_comparison(**{**TINY, "methods": ["rotation", "manual_ste"]})
    assert one["results"]["manual_ste"]["recon_mse"] == two["results"]["manual_ste"]["recon_mse"]


def test_diverging_method_is_reported_and_others_finish(tmp_path, blank_plots):
    out = vq.run_comparison(**{**TINY, "lrE": 1e150, "outdir": str(tmp_path),
                               "methods": ["pca_lloyd", "manual_ste", "procrustes_lloyd"]})
    r = out["results"]["manual_ste"]
    assert r["status"] == "diverged" and 1 <= r["diverged_at_step"] <= TINY["steps"]
    assert out["results"]["procrustes_lloyd"]["status"] == "ok"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["results"]["manual_ste"]["status"] == "diverged"
    assert saved["results"]["procrustes_lloyd"]["pop_recon_mse"] > 0


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "vq_compare.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


BAD = [(["--m", "70"], "--m 70"), (["--rank", "65"], "--rank 65"), (["--K", "0"], "--K 0"),
       (["--K", "30000"], "--K 30000"), (["--n_train", "0"], "--n_train 0"),
       (["--steps", "-1"], "--steps -1"), (["--batch", "0"], "--batch 0"),
       (["--lrW", "0"], "--lrW 0.0"), (["--lrE", "nan"], "--lrE nan"), (["--lrE", "inf"], "--lrE inf"),
       (["--alpha", "-1"], "--alpha -1.0"), (["--beta", "-0.5"], "--beta -0.5"),
       (["--lmin", "0"], "--lmin 0.0"), (["--lmin", "5"], "--lmin 5.0"),
       (["--seed", "-3"], "--seed -3"), (["--methods", "autograd"], "--methods autograd"),
       (["--K", "abc"], "--K"), (["--D", "0"], "--D 0"), (["--dtype", "float16"], "--dtype float16"),
       (["--ema_decay", "1"], "--ema_decay 1.0"), (["--start", "warm"], "--start warm"),
       (["--shift", "-1"], "--shift -1.0"), (["--shift", "nan"], "--shift nan"),
       (["--train_encoder", "2"], "--train_encoder 2"), (["--lr_schedule", "step"], "--lr_schedule step"),
       (["--tail_average", "1"], "--tail_average 1.0"), (["--dead_decay", "1"], "--dead_decay 1.0"),
       (["--dead_threshold", "-2"], "--dead_threshold -2.0"),
       (["--D", "100000", "--n_train", "10000000"], "--n_train 10000000 --n_eval 4000 --D 100000"),
       (["--workers", "-1"], "--workers -1"), (["--steps", "1.5"], "--steps"),
       (["--decoder", "free"], "--decoder free"), (["--affine_ste_a", "-1"], "--affine_ste_a -1.0"), (["--wasserstein_weight", "inf"], "--wasserstein_weight inf")]


@pytest.mark.parametrize("args,named", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.chdir(tmp_path)                              # main() as the command line runs it
    out = tmp_path / "out"
    assert vq.main([*args, "--outdir", str(out)]) == 2
    said = capsys.readouterr()
    lines = said.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and said.out == ""
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_input_from_the_shell_is_one_line_and_no_traceback(tmp_path):
    p = run_cli("--K", "0", "--outdir", str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["vq_compare.py: error: --K 0: must be a whole number >= 1"]
    assert os.listdir(tmp_path) == []


def test_outdir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    p = run_cli("--outdir", str(tmp_path / "file" / "sub"), cwd=tmp_path)
    assert p.returncode == 2 and "--outdir" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_runs_and_writes_its_outputs_without_a_display(tmp_path):
    # no display, and a user's interactive backend that cannot start without one: the plots
    # are drawn without pyplot, so neither matters
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = subprocess.run([sys.executable, os.path.join(HERE, "vq_compare.py"), "--D", "12", "--rank", "4",
                        "--m", "3", "--K", "8", "--n_train", "600", "--n_eval", "300", "--steps", "10",
                        "--batch", "64", "--n_pop", "10000", "--n_init", "2", "--outdir", "res"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**env, "MPLBACKEND": "TkAgg"})
    assert p.returncode == 0, p.stderr
    assert "Verdict" in p.stdout and "Procrustes-Lloyd" in p.stdout
    assert max(map(len, p.stdout.splitlines())) <= 100                    # fits a terminal, a notebook
    assert not re.search(r"-0\.0+(?![0-9])", p.stdout)                    # no signed zeros
    files = os.listdir(tmp_path / "res")
    assert "summary.json" in files and not any(f.startswith(".tmp") for f in files)
    with open(tmp_path / "res" / "comparison.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_help_explains_every_flag_and_the_docs_name_only_real_ones(capsys):
    assert vq.main(["--help"]) == 0
    text = capsys.readouterr().out
    flags = re.findall(r"^  (?:-\w, )?(--\w+)", text, flags=re.M)
    for flag in flags:                                      # every flag says something of its own
        entry = text.split(flag, 1)[1].split("\n  --", 1)[0]
        words = [w for w in re.findall(r"[a-z]{3,}", entry.lower()) if w not in flag]
        assert len(words) >= 3, flag
    docs = "".join(open(os.path.join(HERE, f)).read() for f in ("README.md", "vq_compare.py"))
    named = set(re.findall(r"python vq_compare\.py[^\n`]*", docs))
    for command in named:                                   # the documented commands parse
        for flag in re.findall(r"(--\w+)", command.replace("[--flag value ...]", "")):
            assert flag in flags, (flag, command)


def test_import_has_no_side_effects(tmp_path):
    code = ("import sys, os; sys.path.insert(0, %r); import vq_compare; "
            "assert 'matplotlib' not in sys.modules; print(os.listdir('.'))") % HERE
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# ---------------------------------------------------------------- sweeps

import sweeps  # noqa: E402

SWEEP_ARGS = ["--D", "10", "--rank", "3", "--m", "2", "--K", "4", "--n_train", "400",
              "--n_eval", "200", "--steps", "8", "--batch", "32", "--n_pop", "5000", "--n_init", "2",
              "--log_every", "4", "--seeds", "2", "--K_values", "4", "6", "--beta_values", "0", "0.5",
              "--steps_max", "8", "--steps_every", "4", "--methods", "manual_ste", "rotation",
              "--quiet"]


def for_sweeps(*sweeps, args=SWEEP_ARGS):
    """SWEEP_ARGS without what the given sweeps would refuse as unused: --K when every
    swept cell sets K, grid values of sweeps not run (see sweeps.VALUES_OF)."""
    out, skip = [], False
    for a in args:
        if a.startswith("--"):
            flag = a[2:]
            skip = ((flag == "K" and set(sweeps) <= {"K", "tricks"})
                    or (flag in sweeps_module().VALUES_OF and not set(sweeps_module().VALUES_OF[flag]) & set(sweeps)))
        if not skip:
            out.append(a)
    return out


def sweeps_module():
    import sweeps
    return sweeps


def run_sweeps(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "sweeps.py"), *args],
                          capture_output=True, text=True, timeout=300)


def sweep_here(*args):
    """``sweeps.main`` in this process, its restarts too (--jobs 1): (exit status, stderr)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = sweeps.main([*args, "--jobs", "1"])
    return code, err.getvalue()


def test_doctests_of_sweeps():
    result = doctest.testmod(sweeps)
    assert result.attempted >= 3 and result.failed == 0


def test_confidence_interval_of_a_known_sample():
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445: half-width 2.776445 * sqrt(2.5) / sqrt(5)
    m, sd, lo, hi = sweeps.mean_ci([1, 2, 3, 4, 5])
    assert m == 3 and sd == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert hi - m == pytest.approx(2.7764451052 * math.sqrt(0.5), rel=1e-9)
    assert m - lo == pytest.approx(hi - m, rel=1e-12)
    assert sweeps.t_quantile(2) == pytest.approx(4.30265273, rel=1e-8)
    assert sweeps.t_quantile(9) == pytest.approx(2.26215716, rel=1e-8)
    assert math.isnan(sweeps.mean_ci([1.0])[2])


def test_tiny_sweep_end_to_end_and_jobs_do_not_change_results(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    real_plot = sweeps.plot_sweep
    monkeypatch.setattr(sweeps, "plot_sweep", lambda *a, **k: vq._figure(1, 1)[0])   # b draws the real ones
    code, err = sweep_here("--sweep", "K", "beta", "steps", "verify", "--outdir", str(a), *SWEEP_ARGS)
    monkeypatch.setattr(sweeps, "plot_sweep", real_plot)
    pb = run_sweeps("--sweep", "K", "beta", "steps", "verify", "--outdir", str(b), "--jobs", "2", *SWEEP_ARGS)
    assert code == 0 and pb.returncode == 0, err + pb.stderr
    ra, rb = (a / "results.jsonl").read_text(), (b / "results.jsonl").read_text()
    lines = [json.loads(x) for x in ra.splitlines()]
    # cells on other processes: the same code, other BLAS threads; the last bits may move
    assert_close_json(lines, [json.loads(x) for x in rb.splitlines()], 1e-12)
    # K: 2 cells x 2 seeds x 3 methods, beta the same, steps 1 x 2 x 3, verify 1 x 2
    assert len(lines) == 12 + 12 + 6 + 2
    assert {ln["method"] for ln in lines} == {"pca_lloyd", "manual_ste", "rotation", "fd_vs_manual"}
    with open(a / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    k_rows = [r for r in rows if r["sweep"] == "K"]
    assert len(k_rows) == 2 * 3 and all(r["n_seeds"] == "2" for r in k_rows)
    r = next(r for r in k_rows if r["method"] == "manual_ste" and r["value"] == "4")
    vals = [ln["pop_recon_mse"] for ln in lines if ln["sweep"] == "K" and ln["value"] == 4
            and ln["method"] == "manual_ste"]
    assert float(r["mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
    assert float(r["ci_lo"]) < float(r["mean"]) < float(r["ci_hi"])
    # differences in one unit, % of the baseline's error: the CSV, the console and the plot
    base = next(x for x in k_rows if x["method"] == "pca_lloyd" and x["value"] == "4")
    pct = 100 * (float(r["mean"]) - float(base["mean"])) / float(base["mean"])
    assert float(r["diff_pct"]) == pytest.approx(pct, rel=1e-9)
    assert float(r["diff_pct_lo"]) < float(r["diff_pct"]) < float(r["diff_pct_hi"])
    rows = sweeps.aggregate(lines)
    assert f"{float(r['diff_pct']):+9.3f}% [{float(r['diff_pct_lo']):+.3f}, " in sweeps.format_table(rows)
    ax = sweeps.plot_sweep(rows, "K").axes[1]                # two seeds: points with bars
    drawn = next(c.lines[0] for c in ax.containers if c.get_label() == "Manual STE")
    assert drawn.get_ydata()[0] == pytest.approx(float(r["diff_pct"]), rel=1e-12)
    # the steps sweep on the population (the curves' fixed sample, PCA + Lloyd's on it too):
    # from the k-means start a trained run starts at the baseline itself
    steps = [x for x in rows if x["sweep"] == "steps"]
    assert steps and all(x["metric"] == sweeps.CURVE_METRIC for x in steps)
    first = [x for x in steps if x["value"] == 0]
    assert first and all(x["diff_pct"] == 0 for x in first)
    curve = next(ln for ln in lines if ln["sweep"] == "steps" and ln["method"] == "manual_ste")
    assert curve["curve"][0][1] == curve["curve_baseline"] and curve["curve"][-1][1] != curve["curve_baseline"]
    ver = next(ln for ln in lines if ln["method"] == "fd_vs_manual")
    assert max(ver["gW_rel_err"]) < 1e-6 and max(ver["recon_rel_diff"]) < 1e-6
    for sweep in ("K", "beta", "steps", "verify"):
        assert (b / f"sweep_{sweep}.png").stat().st_size > 1000


def test_resume_after_interruption_gives_the_same_lines(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--sweep", "K", *for_sweeps("K")]
    assert sweep_here("--outdir", str(full), *args)[0] == 0
    text = (full / "results.jsonl").read_text()
    cut.mkdir()
    (cut / "sweep_config.json").write_text((full / "sweep_config.json").read_text())
    lines = text.splitlines(keepends=True)
    (cut / "results.jsonl").write_text("".join(lines[:4]) + lines[4][:25])   # killed mid-line
    code, err = sweep_here("--outdir", str(cut), "--resume", *args)
    assert code == 0, err
    assert (cut / "results.jsonl").read_text() == text


SWEEP_BAD = [(["--K_values"], "--K_values"), (["--K_values", "x"], "--K_values"),
             (["--beta_values", "0", "abc"], "--beta_values"), (["--K_values", "99999"], "--K 99999"),
             (["--sweep", "gamma"], "--sweep"), (["--methods", "nope"], "--methods nope"),
             (["--seeds", "0"], "--seeds 0"), (["--jobs", "-1"], "--jobs -1"),
             (["--sweep", "start", "--start_values", "warm"], "--start_values warm"),
             (["--sweep", "lr", "--lr_values", "0"], "--lr_values 0.0"),
             (["--sweep", "shift", "--shift_values", "-2"], "--shift_values -2.0"),
             (["--quick", "--preset", "tricks", "--tune_seeds", "0"], "--tune_seeds 0: must be >= 1"),
             (["--shard", "4/4"], "--shard 4/4"), (["--shard", "a/b"], "--shard a/b"),
             (["--shard", "1/2", "--merge"], "--shard and --merge"), (["--merge"], "--merge"),
             (["--steps_max", "0"], "--steps_max 0"), (["--sweep", "K", "--K_values", "0"], "--K_values 0"),
             (["--D", "100000", "--n_train", "10000000"], "--n_train 10000000"),
             (["--sweep", "beta", "--beta_values", "-1"], "--beta_values -1.0"),
             (["--start", "nope"], "--start nope"), (["--dtype", "float16"], "--dtype float16")]


@pytest.mark.parametrize("args,named", SWEEP_BAD)
def test_sweep_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.chdir(tmp_path)
    assert sweeps.main(["--outdir", str(tmp_path / "o"), *args]) == 2
    said = capsys.readouterr()
    assert len(said.err.strip().splitlines()) == 1 and named in said.err and said.out == ""
    assert os.listdir(tmp_path) == []


def test_sweep_bad_input_from_the_shell_exits_2(tmp_path):
    p = run_sweeps("--outdir", str(tmp_path / "o"), "--seeds", "0")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["sweeps.py: error: --seeds 0: must be >= 1"]
    assert not (tmp_path / "o").exists()


def test_start_shift_and_lr_sweeps(tmp_path):
    out = tmp_path / "s"
    code, err = sweep_here("--sweep", "start", "lr", "--lr_values", "1", "0.25", "--outdir", str(out),
                           *for_sweeps("start", "lr"))
    assert code == 0, err
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    starts = [ln["value"] for ln in lines if ln["sweep"] == "start"]
    assert list(dict.fromkeys(starts)) == list(vq.START_REGIMES)           # in the documented order
    for sweep, value in (("start", "kmeans"), ("lr", 1.0)):                  # the same cell twice
        a = [ln for ln in lines if ln["sweep"] == sweep and ln["value"] == value]
        assert len(a) == 2 * 3
    same = {(ln["seed"], ln["method"]): ln["pop_recon_mse"] for ln in lines
            if ln["sweep"] == "start" and ln["value"] == "kmeans"}
    assert same == {(ln["seed"], ln["method"]): ln["pop_recon_mse"] for ln in lines
                    if ln["sweep"] == "lr" and ln["value"] == 1.0}
    assert (out / "sweep_start.png").stat().st_size > 1000
    with open(out / "summary.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["sweep"] == "start"]
    assert all(0 < float(r["codes_used"]) <= 1 for r in rows)
    cfg = sweeps._task_config({"sweep": "lr", "value": 0.25, "seed": 0, "steps_every": 1,
                               "settings": {"lrW": 0.4}})
    assert cfg.lrW == 0.1 and cfg.lrE == 0.25 * vq.Config().lrE


def test_collapse_preset_is_the_shifted_codebook_only_study(tmp_path):
    # what the preset's settings do, not what they say: isotropic latents in 8 dimensions,
    # codes started `shift` latent sd off the data, the encoder left where it starts
    args = sweeps.parse_args(["--preset", "collapse", "--outdir", str(tmp_path / "c")])
    assert args.sweep == ["shift"] and args.seeds >= 5
    settings = {**args.settings, "n_train": 4000, "n_eval": 500, "K": 64, "n_init": 1, "steps": 5,
                "n_pop": 1000, "shift": 4.0, "methods": ["manual_ste"]}
    out = vq.run_comparison(**settings, quiet=True)
    p = vq.make_problem(vq.make_config(**settings))
    assert np.allclose(p.lam, 1.0) and out["bounds"]["pca_floor"] == 0       # isotropic, nothing dropped
    sd = vq.latents(p.X_train, p.W0).std(axis=0)
    off = p.E0.mean(axis=0) / sd                             # 64 codes of sd 1 around 4: within 5 se
    assert np.all(np.abs(off - 4.0) < 5 / 8)
    assert np.array_equal(out["results"]["manual_ste"]["W"], p.W0)            # the encoder fixed


def test_shards_run_as_separate_processes_merge_into_the_one_machine_sweep(tmp_path, blank_sweep_plots):
    args = ["--sweep", "K", "beta", *for_sweeps("K", "beta")]
    shards = [subprocess.Popen([sys.executable, os.path.join(HERE, "sweeps.py"), *args, "--outdir",
                                str(tmp_path / "sh"), "--shard", f"{i}/2"], stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in shards), [p.stderr.read() for p in shards]
    files = sorted(os.listdir(tmp_path / "sh"))
    assert files == ["results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl", "sweep_config.json"]
    keys = [{(ln["sweep"], ln["value"], ln["seed"]) for ln in map(json.loads, (tmp_path / "sh" / f).read_text().splitlines())}
            for f in files[:2]]
    assert sum(map(len, keys)) == len(set().union(*keys))                 # disjoint slices
    assert sweep_here(*args, "--outdir", str(tmp_path / "sh"), "--merge")[0] == 0
    assert sweep_here(*args, "--outdir", str(tmp_path / "one"))[0] == 0
    merged = [json.loads(x) for x in (tmp_path / "sh" / "results.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "results.jsonl").read_text().splitlines()]
    assert_close_json(merged, one, 1e-12)                                  # other processes: last bits
    with open(tmp_path / "sh" / "summary.csv") as fa, open(tmp_path / "one" / "summary.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [(r["sweep"], r["value"], r["method"]) for r in ra] == [(r["sweep"], r["value"], r["method"]) for r in rb]
    assert_close_json([{k: float(v) if v else v for k, v in r.items() if k not in ("sweep", "param", "method", "metric")} for r in ra],
                      [{k: float(v) if v else v for k, v in r.items() if k not in ("sweep", "param", "method", "metric")} for r in rb], 1e-12)
    (tmp_path / "sh" / "results.shard-1-of-2.jsonl").unlink()             # a shard lost: refused
    os.remove(tmp_path / "sh" / "results.jsonl")
    code, err = sweep_here(*args, "--outdir", str(tmp_path / "sh"), "--merge")
    assert code == 2 and "runs missing" in err and len(err.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "o"
    assert sweep_here("--sweep", "beta", "--outdir", str(out), *for_sweeps("beta"))[0] == 0
    before = sorted(os.listdir(out))
    stamp = (out / "results.jsonl").read_text()
    code, err = sweep_here("--sweep", "beta", "--outdir", str(out), "--resume", *for_sweeps("beta"), "--lrW", "0.01")
    assert code == 2 and "lrW: 0.08 -> 0.01" in err and len(err.strip().splitlines()) == 1
    assert "alpha" not in err and "None" not in err                     # only what changed
    assert sorted(os.listdir(out)) == before and (out / "results.jsonl").read_text() == stamp
    code, err = sweep_here("--sweep", "beta", "--outdir", str(out), "--resume", *for_sweeps("beta"), "--alpha", "1.0")
    assert code == 0, err                                                # a default, given: the same
    code, err = sweep_here("--sweep", "beta", "--outdir", str(out), *for_sweeps("beta"))   # no --resume
    assert code == 2 and "--resume" in err


# ---------------------------------------------------------------- dtypes, scale

def test_public_functions_keep_float32():
    rng = np.random.default_rng(20)
    W, E, X = (a.astype(np.float32) for a in random_point(rng, 64, 20, 4, 8))
    for est in ("ste", "rotation"):
        g = vq.manual_grads(W, E, X, 1.0, 0.25, est)
        assert g.gW.dtype == np.float32 and g.gE.dtype == np.float32
        g64 = vq.manual_grads(*(a.astype(np.float64) for a in (W, E, X)), 1.0, 0.25, est)
        assert vq.rel_err(g.gW.astype(np.float64), g64.gW) < 1e-4   # float32 rounding only
    assert vq.stiefel_project(W).dtype == np.float32
    assert vq.riemannian_step(W, g.gW, 0.1).dtype == np.float32
    Z = X @ W.T
    assert Z.dtype == np.float32 and vq.nearest(Z, E)[1].dtype == np.float32
    assert vq.lloyd(Z, E, 10).E.dtype == np.float32
    assert vq.fd_grads(W, E, X, 1.0, 0.25).gW.dtype == np.float32      # computed in float64
    out = vq.run_comparison(**{**TINY, "dtype": "float32", "methods": ["manual_ste", "rotation"]})
    for r in out["results"].values():
        assert r["status"] == "ok" and r["W"].dtype == np.float32


def test_fd_ste_is_skipped_above_its_budget_with_a_reason(tmp_path):
    out = vq.run_comparison(**{**TINY, "fd_max_evals": 100, "outdir": str(tmp_path),
                               "methods": ["fd_ste", "manual_ste"]})
    r = out["results"]["fd_ste"]
    assert r["status"] == "skipped" and "--force_fd" in r["note"] and "fd_max_evals" in r["note"]
    assert out["results"]["manual_ste"]["status"] == "ok"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["results"]["fd_ste"]["status"] == "skipped"
    forced = vq.run_comparison(**{**TINY, "fd_max_evals": 100, "force_fd": True, "methods": ["fd_ste"]})
    assert forced["results"]["fd_ste"]["status"] == "ok"


def test_gradient_check_on_a_subset_of_coordinates():
    rng = np.random.default_rng(21)
    W, E, X = random_point(rng, 128, 200, 12, 64)      # 2400 + 768 parameters
    hp = vq.types.SimpleNamespace(alpha=1.0, beta=0.25)
    chk = vq.gradient_errors(vq.METHODS["rotation"], hp, W, None, {"E": E}, X, rng, n_coords=50)
    assert chk["coords"] == 100
    assert chk["gW_rel_err"] < 1e-6 and chk["params_rel_err"] < 1e-6
    fd = vq.fd_grads(W, E, X, 1.0, 0.25, coords={"W": np.array([0, 5]), "E": np.array([3])})
    assert np.isnan(fd.gW).sum() == W.size - 2 and np.isnan(fd.gE).sum() == E.size - 1


def test_comparison_plot_puts_each_method_on_one_line_across_both_panels():
    summary = vq.run_comparison(**{**TINY, "steps": 5})
    fig = vq.plot_comparison(summary)
    left, right = fig.axes[:2]
    fig.canvas.draw()                                      # final layout
    rows = np.arange(len(summary["results"]))
    y_left = left.transData.transform(np.c_[np.zeros_like(rows), rows])[:, 1]
    y_right = right.transData.transform(np.c_[np.zeros_like(rows), rows])[:, 1]
    assert np.allclose(y_left, y_right, atol=0.5)          # pixels
    labels = [t.get_text() for t in left.get_yticklabels()]
    assert labels[int(np.argmax(left.get_yticks()))] == vq.method_label("pca_lloyd")   # top row: baseline


# ---------------------------------------------------------------- processes, notebooks, new methods

def assert_close_json(a, b, rtol):
    """Equal structure and strings; floats equal to ``rtol`` relative (or absolute near 0)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            if "seconds" not in k:
                assert_close_json(a[k], b[k], rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_json(x, y, rtol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rtol * max(abs(a), abs(b), 1.0), (a, b)
    else:
        assert a == b


def test_worker_processes_do_not_change_results():
    rng = np.random.default_rng(22)
    Z = rng.normal(size=(3000, 3))
    a = vq.kmeans(Z, 12, seed=5, n_init=4, workers=1)
    b = vq.kmeans(Z, 12, seed=5, n_init=4, workers=2)
    # the same restarts on other processes (other BLAS threads): the last bits may move
    assert np.allclose(a.E, b.E, rtol=1e-12, atol=1e-12) and np.array_equal(a.labels, b.labels)
    here = vq._json_ready(vq.run_comparison(**{**TINY, "workers": 1}))
    there = vq._json_ready(vq.run_comparison(**{**TINY, "workers": 2}))
    assert here["config"].pop("workers") == 1 and there["config"].pop("workers") == 2
    assert_close_json(here, there, 1e-12)


def test_start_point_and_reference_equal_their_definitions():
    # make_problem runs the restarts of both in one batch (and the reference's start from
    # the lifted baseline once the baseline is known): the results are those of kmeans()
    # on the PCA latents and on the data's coordinates, computed here alone
    cfg = vq.make_config(**{**TINY, "n_init": 3})
    p = vq.make_problem(cfg)
    X_train, _, _ = vq.make_lowrank_data(cfg.D, cfg.rank, cfg.n_train, cfg.n_eval, cfg.seed)
    W0 = vq.pca_encoder(X_train, cfg.m)
    # the same code with the same settings on this machine: bit for bit (vq.latents, not
    # X @ W0.T, which BLAS may round differently)
    base = vq.kmeans(vq.latents(X_train, W0), cfg.K, vq.derived_rng(cfg.seed, "kmeans"), 3, cfg.kmeans_iter)
    assert np.array_equal(p.W0, W0) and np.array_equal(p.E0, base.E)
    S = X_train @ p.U
    ref = vq.kmeans(S, cfg.K, vq.derived_rng(cfg.seed, "unconstrained"), 3, cfg.kmeans_iter)
    lifted = vq.lloyd(S, base.E @ (W0 @ p.U), cfg.kmeans_iter)
    C = p.unconstrained()[0]
    assert np.array_equal(C, vq.best_run([ref, lifted]).E)
    # never worse on the training data than the rank-m baseline it can start from
    assert vq.nearest(S, C)[1].sum() <= vq.nearest(S, base.E @ (W0 @ p.U))[1].sum() * (1 + 1e-12)


NOTEBOOK = """
import json, multiprocessing, os, sys
sys.argv = ["ipykernel_launcher.py", "-f", "/nonexistent/kernel-1.json"]   # what a kernel has
cell = {"__name__": "__main__"}                                           # a cell: no __file__
exec(compile(open(sys.argv_file).read(), "<cell 1>", "exec"), cell)
assert os.listdir(".") == [], "pasting wrote something"
recipe = open(sys.recipe_file).read()
exec(compile(recipe, "<cell 2>", "exec"), cell)                           # the README's recipe
out = cell["run_comparison"](**json.loads(sys.settings), quiet=True,            # library defaults
                             methods=["pca_lloyd", "manual_ste", "ste_beta1", "ste_gain"])
assert multiprocessing.active_children() == [], "a process was left behind"
assert os.listdir(".") == [], "outdir=None wrote something"
print(json.dumps({n: r["pop_recon_mse"] for n, r in out["results"].items()}))
"""


def readme_recipe():
    """The code block of the README's "Adding a method" section, as a user copies it."""
    with open(os.path.join(HERE, "README.md")) as fh:
        text = fh.read()
    section = text[text.index("## Adding a method"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_pasted_into_a_notebook_it_runs_nothing_then_works_and_leaves_no_process(tmp_path):
    (tmp_path / "recipe.py").write_text(readme_recipe())
    settings = json.dumps({k: v for k, v in TINY.items() if k not in ("outdir", "quiet", "workers")})
    code = ("import sys; sys.argv_file, sys.recipe_file, sys.settings = %r, %r, %r\n"
            % (os.path.join(HERE, "vq_compare.py"), str(tmp_path / "recipe.py"), settings)) + NOTEBOOK
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    p = subprocess.run([sys.executable, "-c", code], cwd=run_dir, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    pasted = json.loads(p.stdout)
    imported = vq.run_comparison(**{**TINY, "methods": ["pca_lloyd", "manual_ste"]})
    for name in ("pca_lloyd", "manual_ste"):               # the same code: the same numbers
        assert pasted[name] == imported["results"][name]["pop_recon_mse"]
    assert pasted["ste_beta1"] != pasted["manual_ste"]      # beta = 1 trains another model
    assert pasted["ste_gain"] != pasted["manual_ste"]       # and so does a learned gain


def test_an_imported_run_with_workers_leaves_no_process():
    import multiprocessing
    vq.run_comparison(**{**TINY, "workers": 2, "methods": ["pca_lloyd"]})
    assert multiprocessing.active_children() == []


def test_the_readme_recipe_adds_a_method_everywhere(tmp_path, monkeypatch):
    # followed literally: the recipe's lines go into vq_compare.py after the registry
    src = open(os.path.join(HERE, "vq_compare.py")).read()
    at = src.index("\n\ndef method_label(")
    (tmp_path / "vq_compare.py").write_text(src[:at] + "\n\n" + readme_recipe() + src[at:])
    (tmp_path / "sweeps.py").write_text(open(os.path.join(HERE, "sweeps.py")).read())
    tiny = ["--D", "12", "--rank", "4", "--m", "3", "--K", "8", "--n_train", "600",
            "--n_eval", "300", "--steps", "10", "--batch", "64", "--n_pop", "10000", "--n_init", "2"]
    p = subprocess.run([sys.executable, "vq_compare.py", *tiny, "--outdir", "res"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    for name, label in (("ste_beta1", "STE, beta = 1"), ("ste_gain", "STE, learned gain")):
        assert summary["results"][name]["status"] == "ok"           # run by default
        assert label in p.stdout                                      # the console table
        assert (tmp_path / "res" / f"{name}_logs.json").exists()
        chk = summary["gradient_check"][name]                         # checked like a built-in
        assert chk["gW_rel_err"] < 1e-6 and chk["params_rel_err"] < 1e-6
    import importlib.util                                    # the edited file, imported as a user would
    spec = importlib.util.spec_from_file_location("vq_compare", tmp_path / "vq_compare.py")
    v = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v)
    settings = {a[2:]: int(b) for a, b in zip(tiny[::2], tiny[1::2])}
    s = v.run_comparison(**settings, quiet=True, methods=["manual_ste", "ste_beta1", "ste_gain"])
    legend = v.plot_training_curves(s).axes[0].get_legend_handles_labels()[1]
    ticks = [x.get_text() for x in v.plot_comparison(s).axes[0].get_yticklabels()]
    for label in ("STE, beta = 1", "STE, learned gain"):
        assert label in legend and label in ticks                    # both plots
    colors = [v.color(n) for n in v.METHODS]
    assert len(set(colors)) == len(colors)                           # each its own colour
    monkeypatch.setattr(sweeps, "vq", v)                             # sweeps.py on the edited file
    monkeypatch.setattr(sweeps, "plot_sweep", lambda *a, **k: v._figure(1, 1)[0])   # its lines, not its plot
    code, err = sweep_here("--sweep", "K", "--K_values", "4", "--seeds", "1", *for_sweeps("K", args=tiny), "--outdir",
                           str(tmp_path / "sw"), "--quiet")
    assert code == 0, err
    methods = {json.loads(x)["method"] for x in (tmp_path / "sw" / "results.jsonl").read_text().splitlines()}
    assert {"ste_beta1", "ste_gain"} <= methods


# ---------------------------------------------------------------- properties (hypothesis)



@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 40), D=st.integers(1, 9), K=st.integers(1, 7), seed=st.integers(0, 2**31),
       alpha=st.floats(0, 2), beta=st.floats(0, 2), estimator=st.sampled_from(["ste", "rotation"]))
def test_property_manual_gradients_match_finite_differences(B, D, K, seed, alpha, beta, estimator):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, D + 1))
    W, E, X = random_point(rng, B, D, m, K)
    man = vq.manual_grads(W, E, X, alpha, beta, estimator)
    fd = vq.fd_grads(W, E, X, alpha, beta, estimator)
    scale = max(np.abs(man.gW).max(), 1e-3)                # near-zero gradients: absolute error
    assert np.abs(fd.gW - man.gW).max() <= 1e-6 * scale
    assert np.abs(fd.gE - man.gE).max() <= 1e-6 * max(np.abs(man.gE).max(), 1e-3)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), m=st.integers(1, 4), K=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_property_lloyd_never_worse_than_its_start_and_labels_match(n, m, K, seed):
    rng = np.random.default_rng(seed)
    Z = np.round(rng.normal(size=(n, m)), 1)              # rounded: ties and duplicates occur
    E0 = rng.normal(size=(K, m))
    r = vq.lloyd(Z, E0, max_iter=100)
    assert r.inertia <= vq.nearest(Z, E0)[1].sum() * (1 + 1e-12) + 1e-12
    labels, dist = vq.nearest(Z, r.E)
    assert np.array_equal(labels, r.labels) and dist.sum() == pytest.approx(r.inertia, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- the protocol and the library

def test_the_training_curve_is_the_paired_difference_it_claims():
    p = small_problem(steps=10, log_every=5)
    res = vq.train(p, "manual_ste")
    row = res.logs["eval"][-1]
    n = min(vq.N_CURVE, p.cfg.n_pop)                        # its own stream, drawn again here
    S = vq.derived_rng(p.cfg.seed, "curves").standard_normal((n, len(p.lam))) * np.sqrt(p.lam)
    X = S @ p.U.T
    err = lambda W, E: np.sum((X - E[vq.assign(X @ W.T, E)] @ W) ** 2, axis=1)
    d = err(res.W, res.E) - err(p.W0, p.E0)
    assert row["pop_diff_to_start"] == pytest.approx(d.mean(), rel=1e-9, abs=1e-12)
    assert row["pop_diff_to_start_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-9)
    assert row["curve_recon_mse"] == pytest.approx(err(res.W, res.E).mean(), rel=1e-9)   # the error itself


def test_procrustes_lloyd_is_on_the_training_curves_round_by_round():
    p = small_problem(start="random_codes", methods=["manual_ste", "procrustes_lloyd"])
    s = vq.compare(p, check=False)
    res = s["results"]["procrustes_lloyd"]
    rounds, hist = res["logs"]["eval"], res["logs"]["train_recon_mse"]
    assert [e["step"] for e in rounds] == list(range(len(hist))) and len(hist) > 2
    # each round's point is the model after that round: training error falls, and the last
    # round is the model scored in the table
    assert rounds[-1]["recon_mse"] == pytest.approx(res["recon_mse"], rel=1e-12)
    assert rounds[0]["pop_diff_to_start"] == 0 and rounds[-1]["pop_diff_to_start"] < 0
    fig = vq.plot_training_curves(s)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "Procrustes-Lloyd" in labels and "Manual STE" in labels
    tops = [a for a in fig.axes if "round" in a.get_xlabel()]
    assert len(tops) == 4                                  # its own axis on the four curve panels
    top = tops[0].get_lines()[0]
    assert list(top.get_xdata()) == list(range(len(hist)))
    assert top.get_ydata()[-1] == pytest.approx(rounds[-1]["pop_diff_to_start"])


@pytest.mark.parametrize("name", ["affine_ste", "simvq", "ema_ste"])
def test_reseeding_a_parametrised_codebook_puts_the_code_on_the_latent(name):
    # a re-seeded code of a codebook made of other parameters: the codebook its new
    # parameters give has the latent at that row, and the other rows unchanged
    p = small_problem(methods=[name], dead_threshold=1.0)
    method, hp = vq.METHODS[name], vq.hyperparameters(p.cfg, name)
    rng = np.random.default_rng(1)
    params = method.init(p, hp)
    params = {k: v + 0.1 * rng.normal(size=v.shape) if k in ("C", "s", "t", "P", "b") else v
              for k, v in params.items()}                   # off the start: s, t, P, b not trivial
    before = method.codebook(params, hp)
    codes, values = np.array([1, 4]), rng.normal(size=(2, p.cfg.m))
    after = method.codebook(method.reset(params, codes, values, hp), hp)
    assert np.allclose(after[codes], values, rtol=0, atol=1e-12)
    keep = np.setdiff1d(np.arange(len(before)), codes)
    assert np.allclose(after[keep], before[keep], rtol=0, atol=1e-15)


def test_subspace_angle_of_a_known_rotation():
    for deg in (0.0, 1e-6, 30.0, 89.0):                     # the sine form: exact near 0 too
        t = math.radians(deg)
        W = np.array([[math.cos(t), math.sin(t), 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
        U_m = np.eye(4)[:, [0, 2]]
        assert vq.subspace_angle_deg(W, U_m) == pytest.approx(deg, rel=1e-9, abs=1e-12)


def test_the_optimizer_steps_each_parameter_at_its_rate():
    rng = np.random.default_rng(2)
    W = vq.stiefel_project(rng.normal(size=(3, 7)))
    G, E, gE = rng.normal(size=(3, 7)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    opt = vq.Optimizer({"W": 0.1, "E": 0.3})
    Wn = opt.step("W", W, G, factor=0.5)
    assert np.allclose(Wn @ Wn.T, np.eye(3), atol=1e-12)   # on the manifold
    assert np.array_equal(Wn, vq.riemannian_step(W, G, 0.05))
    assert np.allclose(opt.step("E", E, gE, factor=0.5), E - 0.15 * gE, rtol=0, atol=1e-15)
    # a parameter shared by the K codes steps at lrE / K in a run
    run = vq.Run(small_problem(methods=["simvq"]), "simvq")
    assert run.optimizer.rates["P"] == pytest.approx(TINY_LR_E / TINY["K"]) and run.optimizer.rates["C"] == TINY_LR_E


TINY_LR_E = vq.Config().lrE


def test_verify_trains_both_runs_with_the_one_loop(monkeypatch):
    # the schedule, the untied decoder, a fixed encoder and dead codes reach the verify
    # sweep's runs: its manual run ends where train() ends
    runs, Run = [], vq.Run
    monkeypatch.setattr(vq, "Run", lambda p, n: runs.append(Run(p, n)) or runs[-1])
    settings = dict(lr_schedule="cosine", decoder="untied", dead_threshold=2.0, start="shifted", steps=12)
    out = sweeps.verify_trajectories(small_problem(**settings))
    monkeypatch.setattr(vq, "Run", Run)
    alone = vq.train(small_problem(**settings), "manual_ste")
    fd, man = runs
    assert np.array_equal(man.W, alone.W) and np.array_equal(man.V, alone.V) and np.array_equal(man.E, alone.E)
    assert sum(man.logs["reseeded"]) > 0 and len(out["gW_rel_err"]) == 12
    assert max(out["gW_rel_err"] + out["gE_rel_err"]) < 1e-6 and max(out["max_abs_W_diff"]) < 1e-6


def test_a_script_without_a_main_guard_runs_writes_nothing_and_leaves_no_process(tmp_path):
    (tmp_path / "script.py").write_text(
        "import multiprocessing, sys\nsys.path.insert(0, %r)\nimport vq_compare\n"
        "out = vq_compare.run_comparison(steps=5, n_train=2000, n_eval=500, n_pop=5000, quiet=True)\n"
        "assert multiprocessing.active_children() == []\nprint(sorted(out['results']))\n" % HERE)
    p = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "manual_ste" in p.stdout and sorted(os.listdir(tmp_path)) == ["script.py"]


def test_library_settings_are_checked_by_name_and_type():
    with pytest.raises(vq.ConfigError, match=r"--step 10: unknown setting \(did you mean --steps\?\)"):
        vq.run_comparison(step=10)
    with pytest.raises(vq.ConfigError, match=r"--K '32': must be an integer, got str"):
        vq.run_comparison(K="32")
    with pytest.raises(vq.ConfigError, match=r"--lrE 'fast': must be a number, got str"):
        vq.make_config(lrE="fast")
    assert vq.make_config(n_pop=1e6).n_pop == 1_000_000    # a whole number written as a float
    cfg = vq.make_config()
    assert cfg.outdir == "" and cfg.workers == 1           # writes nothing, starts no process
    assert vq.build_parser().parse_args([]).outdir == "results_out"   # the command line does


def test_a_sweep_of_a_method_registered_at_run_time_runs_with_worker_processes(tmp_path, monkeypatch):
    # a method added by a script, not the file: the workers could not find it, so its
    # cells run in this process; the k-means restarts still use the workers
    monkeypatch.setitem(vq.METHODS, "late_ste", vq.vq_method("STE, added late"))
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = sweeps.main(["--sweep", "K", "--K_values", "4", "--seeds", "1", *for_sweeps("K", args=SWEEP_ARGS[:18]),
                            "--methods", "late_ste", "--jobs", "2", "--quiet", "--outdir", str(tmp_path / "s")])
    assert code == 0, err.getvalue()
    methods = {json.loads(x)["method"] for x in (tmp_path / "s" / "results.jsonl").read_text().splitlines()}
    assert methods == {"pca_lloyd", "late_ste"}


# ------------------------------------------------ optimizers, recipes, variants

def reference_steps(kind, p, grads, lrs, mu=0.9, b1=0.9, b2=0.999, wd=0.0, eps=1e-8):
    """Each optimizer written out from its definition (PyTorch's documentation), a loop
    over steps with no shared code: the parameters after each step."""
    buf, m, v, out = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if kind == "adamw":
            p = p - lr * wd * p
        else:
            g = g + wd * p
        if kind == "sgd":
            p = p - lr * g
        elif kind == "momentum":
            buf = mu * buf + g
            p = p - lr * buf
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("kind", vq.OPTIMIZERS)
def test_each_optimizer_steps_as_its_definition(kind):
    rng = np.random.default_rng(5)
    p0, grads = rng.normal(size=(6, 3)), rng.normal(size=(7, 6, 3))
    factors = np.linspace(1, 0.3, 7)                        # a schedule
    opt = vq.Optimizer({"E": 0.05}, kind, momentum=0.8, betas=(0.85, 0.99), weight_decay=0.1)
    want = reference_steps(kind, p0, grads, 0.05 * factors, mu=0.8, b1=0.85, b2=0.99, wd=0.1)
    p = p0
    for g, f, w in zip(grads, factors, want):
        p = opt.step("E", p, g, f)
        assert np.abs(p - w).max() <= 1e-12 * max(1.0, np.abs(w).max())


@pytest.mark.parametrize("kind", vq.OPTIMIZERS)
def test_riemannian_optimizers_stay_on_the_manifold_and_are_the_euclidean_ones_in_the_tangent_space(kind):
    rng = np.random.default_rng(6)
    W = vq.stiefel_project(rng.normal(size=(3, 8)))
    grads = rng.normal(size=(5, 3, 8))
    # at rate 0 W stays put: the Riemannian state is the Euclidean state of the projected
    # gradients, and the step that moves is the Euclidean direction projected and retracted
    opt = vq.Optimizer({"W": 0.1}, kind, weight_decay=0.3)  # weight decay does not reach W
    for g in grads[:-1]:
        assert np.array_equal(opt.step("W", W, g, 0.0), vq.stiefel_project(W))
    tangent = [vq.tangent(W, g) for g in grads]
    euclid = reference_steps(kind, np.zeros_like(W), tangent, [0.0] * 4 + [1.0])[-1]   # minus the direction
    want = vq.stiefel_project(W + 0.1 * vq.tangent(W, euclid))
    got = opt.step("W", W, grads[-1])
    assert np.abs(got - want).max() < 1e-12
    # and along a run every W has orthonormal rows, the moments carried to each new point
    opt, path = vq.Optimizer({"W": 0.2}, kind), [W]
    for g in rng.normal(size=(30, 3, 8)):
        path.append(opt.step("W", path[-1], g))
        assert np.abs(path[-1] @ path[-1].T - np.eye(3)).max() < 1e-12
        if "buf" in opt.state["W"]:                         # momentum lies in the new tangent space
            assert np.abs(vq.tangent(path[-1], opt.state["W"]["buf"]) - opt.state["W"]["buf"]).max() < 1e-12


def test_a_variant_is_the_method_with_its_own_settings():
    base = vq.run_comparison(**TINY, methods=["affine_ste"], affine_ste_nu=0.0, optimizer="adam", lrE=0.01)
    variant = vq.run_comparison(**TINY, methods=["affine_ste[nu=0, optimizer=adam, lrE=0.01]"])
    a, b = base["results"]["affine_ste"], variant["results"]["affine_ste[nu=0, optimizer=adam, lrE=0.01]"]
    assert np.array_equal(a["E"], b["E"]) and np.array_equal(a["W"], b["W"])   # the same code, the same settings
    assert variant["methods"]["affine_ste[nu=0, optimizer=adam, lrE=0.01]"]["settings"]["optimizer"] == "adam"
    # the matched ablation: sync nu without the affine map (a = 0) is STE with alpha + nu
    out = vq.run_comparison(**TINY, methods=["affine_ste[a=0]", "manual_ste[alpha=3]"])
    s, t = out["results"]["affine_ste[a=0]"], out["results"]["manual_ste[alpha=3]"]
    assert np.abs(s["E"] - t["E"]).max() < 1e-9 and np.abs(s["W"] - t["W"]).max() < 1e-9
    for bad, words in (("affine_ste[mu=0]", "mu is not a setting"), ("manual_ste[lrE=-1]", "--lrE -1.0: must be"),
                       ("manual_ste[optimizer=lbfgs]", "must be one of sgd")):
        with pytest.raises(vq.ConfigError, match=re.escape(words)):
            vq.make_config(**TINY, methods=[bad])


def test_the_command_line_splits_methods_outside_brackets():
    args = vq.build_parser().parse_args(["--methods", "manual_ste,affine_ste[nu=0, a=0]", "rotation"])
    assert vq.split_methods(args.methods) == ["manual_ste", "affine_ste[nu=0, a=0]", "rotation"]
    assert vq.main(["--methods", "manual_ste[K=3]", "--outdir", ""]) == 2


def test_authors_recipes_reach_each_method_and_keep_the_checker_exact():
    out = vq.run_comparison(**TINY, recipe="authors", lrE=0.01, lrW=0.01,
                            methods=["manual_ste", "wasserstein", "wasserstein[encoder=1]", "simvq", "affine_ste"])
    for name, check in out["gradient_check"].items():
        if isinstance(check, dict):
            assert check["gW_rel_err"] < 1e-6 and check["params_rel_err"] < 1e-6, name
    # per-element means: the VQ terms weigh D/m times more against the reconstruction
    s = out["methods"]["manual_ste"]["settings"]
    assert s["beta"] / s["alpha"] == pytest.approx(0.25) and s["alpha"] == pytest.approx(TINY["D"] / TINY["m"])
    # the authors detach the latents: W's step ignores the distance, unlike the encoder path
    prob = small_problem(recipe="authors")
    Xb, hp = prob.X_train[:64], vq.hyperparameters(vq.method_config(prob.cfg, "wasserstein")[1], "wasserstein")
    fr = vq.freeze(prob.W0, prob.E0 + 1.0, Xb)
    detached = vq.wasserstein_loss_and_grads(prob.W0, None, {"E": prob.E0 + 1.0}, Xb, fr, hp)
    ste = vq.manual_grads(prob.W0, prob.E0 + 1.0, Xb, hp.alpha, hp.beta, frozen=fr)
    assert np.array_equal(detached.gW, ste.gW)
    hp.encoder = 1.0
    assert np.abs(vq.wasserstein_loss_and_grads(prob.W0, None, {"E": prob.E0 + 1.0}, Xb, fr, hp).gW - ste.gW).max() > 1e-6


def test_periodic_replacement_copies_used_codes_on_its_period():
    out = vq.run_comparison(**{**TINY, "steps": 30}, start="shifted", methods=["nsvq", "nsvq[replace_every=5]"])
    r, plain = out["results"]["nsvq[replace_every=5]"], out["results"]["nsvq"]
    replaced = np.flatnonzero(r["logs"]["reseeded"]) + 1                 # steps that replaced codes
    assert replaced.size and np.all(replaced % 5 == 0) and replaced.max() <= 30 - 2 * 5
    assert r["status"] == "ok" and r["dead_frac"] < plain["dead_frac"]


# ------------------------------------------------------------------- tuning

def drive(tuner, score):
    """Run a Tuner against a score of the rate (None: diverged): the points it asked for."""
    asked = []
    while tuner.wanted():
        for k in tuner.wanted():
            asked.append(tuner.rate(tuner.order[0], k))
            tuner.record(k, [score(tuner.order[0], asked[-1])])
    return asked


def test_the_tuner_extends_its_grid_until_the_best_is_inside():
    best = {"lrE": 2.0 ** 4, "lrW": 2.0 ** -3}
    bowl = lambda name, r: 1 + (math.log2(r) - math.log2(best[name])) ** 2
    t = sweeps.Tuner("manual_ste", {"lrE": 1.0, "lrW": 1.0}, ("lrE", "lrW"), limit=10)
    drive(t, bowl)
    assert t.rates == best
    assert all(g["status"] == "inside" for g in t.report()["grid"].values())
    for g in t.report()["grid"].values():                  # the choice has a neighbour on each side
        rates = [p[0] for p in g["points"]]
        chosen = min(g["points"], key=lambda p: p[1])[0]
        assert min(rates) < chosen < max(rates)
    assert t.spec() == "manual_ste[lrE=16, lrW=0.125]"
    # a divergence makes its point and the one below it fail: the choice keeps two doublings away
    t = sweeps.Tuner("x", {"lrE": 1.0}, ("lrE",), limit=10)
    drive(t, lambda name, r: None if r >= 8 else 10 - math.log2(r))      # better and better, then diverges
    assert t.rates["lrE"] == 2.0 and t.report()["grid"]["lrE"]["status"] == "inside"
    # everything diverges: smaller rates until one does not (and its double does not either)
    t = sweeps.Tuner("x", {"lrE": 1.0}, ("lrE",), limit=10)
    drive(t, lambda name, r: None if r > 2.0 ** -4 else 1.0 + r)
    assert t.rates["lrE"] <= 2.0 ** -5
    # a rate with no effect keeps its centre; at the limit the status says so
    t = sweeps.Tuner("x", {"lrE": 0.5}, ("lrE",), limit=3)
    assert drive(t, lambda name, r: 1.0) == [0.25, 0.5, 1.0] and t.report()["grid"]["lrE"]["status"] == "no effect"
    t = sweeps.Tuner("x", {"lrE": 1.0}, ("lrE",), limit=3)
    drive(t, lambda name, r: 1 / r)
    assert t.rates["lrE"] == 8.0 and t.report()["grid"]["lrE"]["status"] == "at its bound"


TUNE_TINY = ["--sweep", "K", "--K_values", "4", "--seeds", "2", "--D", "8", "--rank", "3", "--m", "2",
             "--n_train", "400", "--n_eval", "200", "--steps", "8", "--batch", "64", "--n_pop", "2000",
             "--n_init", "1", "--tune", "--tune_seeds", "1", "--tune_samples", "2000", "--quiet"]


def test_tune_scores_each_method_at_its_tuned_rates_on_seeds_it_was_not_tuned_on(monkeypatch, tmp_path):
    seen = []
    compare = vq.compare

    def spy(problem, check=True, stream="population"):
        seen.append((problem.cfg.seed, stream))
        return compare(problem, check, stream)
    monkeypatch.setattr(vq, "compare", spy)
    args = [*TUNE_TINY, "--methods", "manual_ste"]
    args[args.index("--K_values") + 1:args.index("--K_values") + 2] = ["4", "6"]
    one, shards = tmp_path / "one", tmp_path / "shards"
    code, err = sweep_here(*args, "--outdir", str(one))
    assert code == 0, err
    chosen = json.loads((one / "tuning.json").read_text())
    lines = [json.loads(x) for x in (one / "results.jsonl").read_text().splitlines()]
    assert (one / "tuning_lrE.png").exists() and (one / "tuning_lrW.png").exists()
    assert set(chosen["K=4"]) == {"manual_ste"}              # the fitted reference has no rates
    for line in lines:
        if line["method"] != "pca_lloyd":
            assert vq.parse_spec(line["run_as"])[1] == chosen[f"K={line['value']}"][line["method"]]["rates"]
    for g in (g for ms in chosen.values() for r in ms.values() for g in r["grid"].values()):
        assert g["status"] in ("inside", "no effect")
    tuning = {seed for seed, stream in seen if stream == "validation"}
    scoring = {seed for seed, stream in seen if stream == "population"}
    assert scoring == {0, 1} and tuning == {sweeps.TUNE_SEED} and not tuning & scoring
    # on a cluster each shard tunes its share of the cells, and scores in a second pass
    # once every cell it scores is tuned; merged, the one machine's sweep
    for i in (0, 1, 0):
        assert sweep_here(*args, "--outdir", str(shards), "--shard", f"{i}/2")[0] == 0
    assert len(list(shards.glob("tuning.shard-*-of-2.json"))) == 2
    assert sweep_here(*args, "--outdir", str(shards), "--merge")[0] == 0
    assert json.loads((shards / "tuning.json").read_text()) == chosen
    assert (shards / "results.jsonl").read_text() == (one / "results.jsonl").read_text()


def test_ablations_are_the_matched_variants_under_each_recipe():
    args = sweeps.parse_args(["--ablations", "--methods", "manual_ste", "affine_ste", "fsq", "--outdir",
                              tempfile.mkdtemp()])
    m = args.settings["methods"]
    assert {"affine_ste[a=0]", "affine_ste[nu=0]", "manual_ste[alpha=3]", "manual_ste[dead_threshold=1]",
            "affine_ste[dead_threshold=1]"} <= set(m)
    assert not any(x.startswith("fsq[") or x.startswith("pca_lloyd[") for x in m)
    authors = sweeps.parse_args(["--ablations", "--recipe", "authors", "--methods", "affine_ste", "--outdir",
                                 tempfile.mkdtemp()]).settings["methods"]
    ste = [x for x in authors if x.startswith("manual_ste[alpha")][0]
    affine = vq.method_config(vq.make_config(recipe="authors"), "affine_ste")[1]
    matched = vq.method_config(vq.make_config(recipe="authors"), ste)[1]
    assert matched.alpha == affine.alpha + 2.0 and matched.beta == affine.beta     # nu = 2 into alpha
    assert matched.optimizer == affine.optimizer == "adamw" and matched.weight_decay == affine.weight_decay


def test_tuned_knobs_stay_inside_their_authors_range():
    # a knob steps by factors of 2 from its configured value, never outside the range
    t = sweeps.Tuner("diveq", {"lrE": 1.0, "noise": 1e-3}, ("lrE", "noise"), limit=10, spans={"noise": (1e-4, 1e-1)})
    drive(t, lambda name, r: 1.0 / r if name == "noise" else 1 + math.log2(r) ** 2)    # wants ever more noise
    assert t.rates == {"lrE": 1.0, "noise": 1e-3 * 2 ** 6} and t.report()["grid"]["noise"]["status"] == "at its bound"
    assert max(p[0] for p in t.report()["grid"]["noise"]["points"]) <= 1e-1
    t = sweeps.Tuner("x", {"a": 50.0}, ("a",), limit=10, spans={"a": (1.0, 10.0)})
    assert drive(t, lambda name, r: 1.0) == [] and t.report()["grid"]["a"]["status"] == "outside its range"
    cfg = vq.make_config()
    assert sweeps.tunable(cfg, "diveq", knobs=True) == ("lrE", "lrW", "noise")
    assert sweeps.tunable(cfg, "diveq[noise=0.01]", knobs=True) == ("lrE", "lrW")   # set by the variant: kept
    assert sweeps.grid_centre(cfg, "affine_ste")[1] == {"a": (1.0, 10.0)}


def test_fresh_batches_come_from_the_true_distribution_and_are_reproducible():
    problem = small_problem(fresh_batches=1, steps=300, batch=256)
    drawn = [Xb for _, Xb in vq.batches(problem)]
    again = [Xb for _, Xb in vq.batches(problem)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again))      # its own stream: the same batches
    X = np.concatenate(drawn)                                          # 76,800 fresh samples
    train = {row.tobytes() for row in problem.X_train}
    assert not any(row.tobytes() in train for row in X[:1000])         # none is a training sample
    Sigma = (problem.U * problem.lam) @ problem.U.T
    assert np.linalg.norm(X.T @ X / len(X) - Sigma) < 0.03 * np.linalg.norm(Sigma)   # sampling error ~ 1/sqrt(n)
    a = vq.run_comparison(**{**TINY, "fresh_batches": 1, "methods": ["manual_ste"]})["results"]["manual_ste"]
    b = vq.run_comparison(**{**TINY, "methods": ["manual_ste"]})["results"]["manual_ste"]
    assert np.abs(a["E"] - b["E"]).max() > 1e-6                        # other batches, another run


# ------------------------------------------- Issue 20: a published study, large K

def _brute_nearest(Z, E):
    """The nearest code from the whole distance matrix, in float64 (ties: lower index)."""
    d = ((Z.astype(np.float64)[:, None, :] - E.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1), np.sort(d, axis=1)[:, 1] if E.shape[0] > 1 else None


def _same_labels(labels, Z, E):
    """Labels that pick the nearest code, to rounding: where they differ from the brute
    force, the two codes' distances differ by less than a few ulps of their size."""
    lab, d1, _ = _brute_nearest(Z, E)
    d_mine = ((Z.astype(np.float64) - E.astype(np.float64)[labels]) ** 2).sum(1)
    scale = (np.linalg.norm(Z, axis=1) + np.linalg.norm(E, axis=1).max()) ** 2
    return np.all((labels == lab) | (d_mine - d1 <= 64 * np.finfo(np.float64).eps * scale))


@pytest.mark.parametrize("shift", [0.0, 1.5, 4.0, 12.0])
def test_pruned_search_finds_the_nearest_code_whatever_the_shift(shift):
    # the projection bound rules codes out exactly: where it prunes, its labels are the
    # brute-force ones; where it cannot (codes among the data), it hands over (None)
    rng = np.random.default_rng(int(10 * shift))
    for n, K, m in [(1500, 400, 8), (1000, 150, 3)]:
        Z = rng.normal(size=(n, m)) + shift
        E = rng.normal(size=(K, m))
        E[:5] = Z[:5] + 1e-3                                 # a few codes among the data, as training leaves them
        for a, b in ((Z, E), (E, Z)):                        # and the other way: the nearest latent of each code
            found = vq._nearest_pruned(a, b)
            if shift >= 4:
                assert found is not None                     # far codes: almost all ruled out
            if found is not None:
                lab, dist = found
                assert _same_labels(lab, a, b)
                assert np.allclose(dist, _brute_nearest(a, b)[1], rtol=1e-9, atol=1e-9)
    Z = rng.normal(size=(1500, 8))                           # codes drawn like the data: nothing to rule out
    assert vq._nearest_pruned(Z, rng.normal(size=(400, 8))) is None


def test_float32_screen_gives_the_float64_labels_even_at_near_ties(monkeypatch):
    # pairs of codes 1e-6 apart (float32 cannot order them) and points between them: the
    # screen must hand those rows to float64, and every label is the float64 search's
    rng = np.random.default_rng(40)
    E = rng.normal(size=(300, 6))
    E = np.concatenate([E, E + 1e-6 * rng.normal(size=E.shape)])
    Z = np.concatenate([rng.normal(size=(1500, 6)), E[:300] + 1e-4 * rng.normal(size=(300, 6))])
    pure = vq._nearest_full(Z, E, screen=False)
    for inputs in ((Z, E), (Z.astype(np.float32), E.astype(np.float32))):
        lab, dist = vq._nearest_full(*inputs, screen=True)
        ref = vq._nearest_full(*(x.astype(np.float64) for x in inputs), screen=False)
        assert np.array_equal(lab, ref[0]) and dist.dtype == inputs[0].dtype
        assert np.allclose(dist, ref[1], rtol=1e-5 if inputs[0].dtype == np.float32 else 1e-12, atol=1e-9)
    assert _same_labels(pure[0], Z, E)
    # nearest() takes these paths by size: the same labels whichever it takes
    monkeypatch.setattr(vq, "_SCREEN_FROM", 1)
    monkeypatch.setattr(vq, "_PRUNE_FROM", 1)
    assert np.array_equal(vq.nearest(Z, E)[0], pure[0])
    Zs = Z + 6.0                                             # pruned
    assert np.array_equal(vq.nearest(Zs, E)[0], vq._nearest_full(Zs, E, screen=False)[0])


def test_wasserstein_eigh_is_the_exact_distance_when_covariances_commute_and_its_gradients_are_exact():
    rng = np.random.default_rng(41)
    # isotropic codes: S_z S_c is symmetric, the approximation is exact but for its 1e-8
    # inside each root (sum_i 1e-8 / sqrt(l_i) / W2, below 1e-7 here)
    Z = rng.normal(size=(400, 4)) * [2.0, 1.0, 0.5, 1.5] + 0.3
    G = rng.normal(size=(300, 4))
    G = (G - G.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(G.T, bias=True)).T)   # covariance I
    assert vq.wasserstein_eigh(Z, 1.7 * G) == pytest.approx(float(vq.wasserstein_distance(Z, 1.7 * G)), rel=1e-7)
    # correlated covariances: they differ, and the gradients are those of the function computed
    E = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4))
    assert abs(vq.wasserstein_eigh(Z, E) - vq.wasserstein_distance(Z, E)) > 1e-4
    Wd, gZ, gE = vq.wasserstein_eigh_grads(Z[:60], E)
    assert Wd == pytest.approx(float(vq.wasserstein_eigh(Z[:60], E)), rel=1e-14)
    assert vq.rel_err(_fd(lambda E_: vq.wasserstein_eigh(Z[:60], E_), E, 1e-6), gE) < 1e-6
    assert vq.rel_err(_fd(lambda Z_: vq.wasserstein_eigh(Z_, E), Z[:60], 1e-6), gZ) < 1e-6


def test_the_studys_quantizers_are_checked_by_the_one_checker():
    specs = ["ema_ste[debias=0, ema_decay=0.9]", "online", "simvq[linear_init=1]",
             "wasserstein[exact=0, weight=10, alpha=0.1]"]
    out = vq.run_comparison(**{**TINY, "methods": specs, "train_encoder": 0, "optimizer": "momentum"})
    for spec in specs:
        assert out["results"][spec]["status"] == "ok"
        chk = out["gradient_check"].get(spec)
        if chk:                                              # EMA trains no parameter by gradient
            assert chk["params_rel_err"] < 1e-6 and chk["loss_rel_err"] < 1e-12


def test_ema_without_debiasing_is_the_simulations_update_in_its_own_frame():
    # the update of Fang et al.'s script written out here in its frame (codes drawn about the
    # origin, data shifted by mu) and ours in ours (data centred, codes shifted): the same
    # codes, translated, step after step, unused codes flying off included
    p = small_problem(train_encoder=0, start="shifted", shift=3.0, steps=6, K=16, dtype="float64")
    method, mcfg = vq.method_config(p.cfg, "ema_ste[debias=0, ema_decay=0.9]")
    hp = vq.hyperparameters(mcfg, "ema_ste")
    params = method.init(p, hp)
    origin = p.E0.mean(axis=0)
    E, size, avg = p.E0 - origin, np.zeros(16), p.E0 - origin   # theirs, in their frame
    for t, Xb in vq.batches(p):
        fr = method.freeze(p.W0, None, params, Xb, hp, None)
        params, _ = method.update(params, fr, hp)
        z = vq.latents(Xb, p.W0) - origin
        onehot = np.eye(16)[_brute_nearest(z, E)[0]]
        size = 0.9 * size + 0.1 * onehot.sum(0)
        avg = 0.9 * avg + 0.1 * onehot.T @ z
        n = size.sum()
        E = avg / ((size + 1e-5) / (n + 16 * 1e-5) * n)[:, None]
        assert np.allclose(params["E"] - origin, E, rtol=1e-9, atol=1e-9 * np.abs(E).max())
    assert np.abs(E).max() > 1e3                             # some code never used: it has left


def test_online_clustering_anchors_unused_codes_on_their_nearest_latent():
    rng = np.random.default_rng(42)
    Z = rng.normal(size=(400, 3))
    E = np.concatenate([rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 20])   # 5 far codes: unused
    hp = vq.types.SimpleNamespace(decay=0.9)
    prob = np.zeros(10)
    out = vq.online_anchor({"E": E, "prob": prob}, Z, hp)
    counts = np.bincount(_brute_nearest(Z, E)[0], minlength=10)
    p_new = 0.1 * counts / 400
    w = np.exp(-10 * 10 * p_new / 0.1 - 1e-3)[:, None]
    anchor = Z[((E[:, None, :] - Z[None]) ** 2).sum(-1).argmin(1)]
    assert np.allclose(out["prob"], p_new) and np.allclose(out["E"], E * (1 - w) + anchor * w)
    gap = np.linalg.norm(E - anchor, axis=1)
    assert np.all(np.linalg.norm(out["E"] - anchor, axis=1)[5:] <= 1.01e-3 * gap[5:])   # unused: onto the data
    busy = counts >= 0.25 * 400                              # w < exp(-25): they stay
    assert busy.sum() >= 1 and np.all(np.linalg.norm(out["E"] - E, axis=1)[busy] <= 1e-10 * gap[busy])


def test_linear_quantizer_starts_as_pytorchs_linear_on_the_centred_codes():
    p = small_problem(start="shifted", shift=4.0, K=16)
    hp = vq.hyperparameters(vq.method_config(p.cfg, "simvq[linear_init=1]")[1], "simvq")
    params = vq.METHODS["simvq"].init(p, hp)
    bound = 1 / math.sqrt(p.cfg.m)
    centre = p.E0.mean(axis=0)
    assert np.abs(params["P"]).max() <= bound and np.abs(params["b"] - centre).max() <= bound
    assert np.allclose(params["C"].mean(axis=0), 0, atol=1e-12)
    assert np.allclose(vq.simvq_codebook(params, hp), (p.E0 - centre) @ params["P"].T + params["b"])
    again = vq.METHODS["simvq"].init(p, hp)                  # its own stream: reproducible
    assert np.array_equal(again["P"], params["P"])
    ident = vq.METHODS["simvq"].init(p, vq.hyperparameters(p.cfg, "simvq"))
    assert np.array_equal(vq.simvq_codebook(ident, hp), p.E0)


def test_fresh_metrics_every_n_steps_on_the_same_samples_for_every_method():
    p = small_problem(D=6, rank=6, m=6, lmax=1.0, lmin=1.0, steps=9, eval_every=4, eval_samples=3000,
                      train_encoder=0, start="shifted", shift=2.0)
    runs = {name: vq.train(p, name) for name in ("manual_ste", "online")}
    for r in runs.values():
        rows = r.logs["fresh"]
        assert [row["step"] for row in rows] == [0, 1, 4, 8]
        for row in rows:                                      # m = D = rank: quantization = reconstruction
            assert row["quant_error"] == pytest.approx(row["recon_mse"], rel=1e-9)
            assert 0 < row["codes_used"] <= 1 and row["w2"] > 0
    a, b = (runs[k].logs["fresh"][0] for k in runs)
    assert a == b                                             # the same start on the same samples
    # the step-0 row is the start's error on fresh samples: close to the population error
    S = vq.derived_rng(p.cfg.seed, "monitor").standard_normal((3000, 6))
    direct = vq.nearest(vq.latents(S, p.W0 @ p.U), p.E0)[1].mean()
    assert a["quant_error"] == pytest.approx(direct, rel=1e-9)


def test_fang2025_preset_runs_their_quantizers_and_tables_them_against_their_data(tmp_path):
    import sweeps
    theirs = sweeps.read_fang()
    assert theirs[("vanilla", 4.0)][2000] == pytest.approx((5.294421672821045, 0.00067138671875))
    assert len(theirs) == 45 and all(len(v) == 22 for v in theirs.values())
    args = sweeps.parse_args(["--preset", "fang2025", "--outdir", str(tmp_path / "f")])
    s = args.settings
    assert (s["K"], s["batch"], s["steps"], s["eval_every"], s["eval_samples"]) == (16384, 50000, 2000, 100, 200000)
    assert s["optimizer"] == "momentum" and s["fresh_batches"] == 1 and s["train_encoder"] == 0
    assert {sweeps.fang_quantizer(m) for m in s["methods"]} == {None, "vanilla", "ema", "online", "linear",
                                                                "wasserstein"}
    assert "simvq[linear_init=1, lrE=327.68]" in s["methods"]          # their 0.02 on P and b
    # the issue's test at one step
    assert sweeps.fang_within([(1.05, 0.5)], (1.0, 0.45)) == (True, True)
    assert sweeps.fang_within([(1.2, 0.5)], (1.0, 0.3)) == (False, False)
    assert sweeps.fang_within([(0.8, 0.1), (1.3, 0.1)], (1.0, 0.1)) == (True, True)   # wide seeds: inside
    tiny = ["--preset", "fang2025", "--quick", "--K", "32", "--batch", "200", "--steps", "100", "--eval_every", "50",
            "--eval_samples", "1000", "--n_train", "1000", "--n_pop", "1000", "--shift_values", "4",
            "--quiet", "--outdir", str(tmp_path / "q")]
    assert sweeps.main(tiny) == 0
    table = (tmp_path / "q" / "fang2025.md").read_text()
    assert "| 4 | vanilla (manual_ste[lrE=1]) |" in table and (tmp_path / "q" / "fang2025.png").stat().st_size > 0
    line = next(json.loads(x) for x in (tmp_path / "q" / "results.jsonl").read_text().splitlines()
                if json.loads(x)["method"] == "online[lrE=3]")
    assert [f[0] for f in line["fresh"]] == [0, 1, 50, 100]


# ------------------------------------------------- Issue 21: interrupted runs

def _start(cmd, cwd):
    """``cmd`` in its own process group, as a terminal's foreground job."""
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _children(pid):
    """Process ids of the children of ``pid`` (Linux's /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            out += fh.read().split()
    return out


def _ctrl_c(p):
    """Ctrl-C to the whole process group (as a terminal sends it): (exit status, stderr)."""
    import signal
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def test_ctrl_c_is_one_line_exit_130_and_resume_finishes_the_sweep_as_if_uninterrupted(tmp_path):
    # the k-means restarts of the comparison run on worker processes: they get the signal too,
    # here while they start (before they could set anything up)
    one = _start([sys.executable, os.path.join(HERE, "vq_compare.py"), "--outdir", "out",
                  "--n_train", "20000", "--workers", "2"], tmp_path)
    args = ["--sweep", "K", "--K_values", "4", "8", "--seeds", "8", "--D", "8", "--rank", "3", "--m", "2",
            "--n_train", "300", "--n_eval", "100", "--steps", "30", "--batch", "64", "--n_pop", "2000",
            "--n_init", "2", "--methods", "manual_ste", "rotation", "--quiet"]
    sweep = _start([sys.executable, os.path.join(HERE, "sweeps.py"), *args, "--outdir", "sw", "--jobs", "1"],
                   tmp_path)
    while not _children(one.pid) and one.poll() is None:     # the comparison: its workers starting
        time.sleep(0.002)
    code, err1 = _ctrl_c(one)
    assert code == 130 and err1.count("\n") == 1 and "interrupted" in err1 and "Traceback" not in err1, err1
    assert not (tmp_path / "out").exists()                  # nothing saved: no folder left behind
    saved, t0 = tmp_path / "sw" / "results.jsonl", time.perf_counter()
    while not (saved.exists() and saved.read_text().count("\n") >= 3) and time.perf_counter() - t0 < 60:
        time.sleep(0.01)                                     # interrupted between cells, some saved
    code, err = _ctrl_c(sweep)
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sweeps.py: interrupted: ") and err.strip().endswith("--resume"), err
    # the command it printed finishes the sweep; the lines equal an uninterrupted sweep's
    assert sweep_here(*args, "--outdir", str(tmp_path / "sw"), "--resume")[0] == 0
    assert sweep_here(*args, "--outdir", str(tmp_path / "whole"))[0] == 0
    assert saved.read_text() == (tmp_path / "whole" / "results.jsonl").read_text()


def test_a_worker_cannot_be_interrupted_while_it_starts():
    # a worker imports this file before its initializer ignores Ctrl-C; until then Ctrl-C
    # must be blocked in it (else a terminal's Ctrl-C prints its traceback)
    def guarded(pid):
        with open(f"/proc/{pid}/status") as fh:
            masks = {k: int(v, 16) for k, v in (ln.split(":") for ln in fh) if k in ("SigBlk", "SigIgn")}
        return bool((masks["SigBlk"] | masks["SigIgn"]) & (1 << (signal.SIGINT - 1)))
    seen = {}
    with vq.process_pool(2) as pool:
        futures = []
        for _ in range(2):
            futures.append(pool.submit(int, "1"))
            for pid in _children(os.getpid()):               # read at once: the worker is still starting
                seen.setdefault(pid, guarded(int(pid)))
        assert [f.result() for f in futures] == [1, 1]
    assert seen and all(seen.values()), seen
    assert not (signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGINT})   # held back, then let go


def test_ctrl_c_while_the_outputs_are_written_says_the_set_is_incomplete(tmp_path, capsys, monkeypatch,
                                                                         blank_plots):
    def interrupted(fig, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(vq, "save_figure", interrupted)      # after summary.json and the logs
    out = tmp_path / "o"
    assert vq.main(["--D", "8", "--rank", "3", "--m", "2", "--K", "4", "--n_train", "300", "--n_eval", "100",
                    "--steps", "3", "--batch", "32", "--n_pop", "1000", "--quiet", "--outdir", str(out),
                    "--workers", "1"]) == 130
    err = capsys.readouterr().err
    written = len(os.listdir(out))
    assert err.count("\n") == 1 and f"{written} of them written" in err and "incomplete" in err, err
    assert written >= 1


def test_a_run_into_a_used_folder_replaces_its_outputs_as_a_set(tmp_path, blank_plots):
    out = str(tmp_path / "o")
    base = ["--D", "8", "--rank", "3", "--m", "2", "--K", "4", "--n_train", "300", "--n_eval", "100",
            "--steps", "5", "--batch", "64", "--n_pop", "1000", "--outdir", out, "--workers", "1"]
    assert vq.main(base + ["--methods", "manual_ste", "rotation"]) == 0
    assert (tmp_path / "o" / "rotation_logs.json").exists()
    assert vq.main(base + ["--methods", "manual_ste"]) == 0
    logs = sorted(f for f in os.listdir(out) if f.endswith("_logs.json"))
    assert logs == ["manual_ste_logs.json"]


# ------------------------------------------- Issue 21: settings that contradict each other

@pytest.mark.parametrize("args, flags", [
    (["--shift", "2"], ("--shift", "--start")),
    (["--dead_decay", "0.5"], ("--dead_decay", "--dead_threshold")),
    (["--replace_below", "0.1"], ("--replace_below", "--replace_every")),
    (["--momentum", "0.5"], ("--momentum", "--optimizer")),
    (["--betas", "0.5", "0.9", "--optimizer", "momentum"], ("--betas", "--optimizer")),
    (["--lrV", "0.1"], ("--lrV", "--decoder")),
    (["--eval_samples", "1000"], ("--eval_samples", "--eval_every")),
    (["--affine_ste_nu", "1"], ("--affine_ste_nu", "--methods")),
    (["--ema_decay", "0.9", "--methods", "manual_ste"], ("--ema_decay", "--methods")),
    (["--batch", "50000"], ("--batch", "--n_train")),
])
def test_settings_that_cannot_all_hold_are_refused_before_any_work(tmp_path, capsys, args, flags):
    t0 = time.perf_counter()
    assert vq.main([*args, "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in flags), err
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 2
    # where the setting matters, it runs: the same check passes (no work done here)
    if args[0] == "--shift":
        vq.contradiction(vq.build_config({"shift": 2.0, "start": "shifted"}, dependencies=False))


@pytest.mark.parametrize("args, words", [
    (["--sweep", "K", "--K_values", "8", "16", "--K", "64"], "--K 64: fixed"),
    (["--sweep", "K", "--beta_values", "0", "1"], "--beta_values: only used by --sweep beta"),
    (["--sweep", "beta", "--steps_max", "100"], "--steps_max: only used by --sweep steps"),
    (["--sweep", "shift", "--shift_values", "1", "2"], "--shift 1.0: only matters with --start shifted"),
    (["--sweep", "K", "--workers", "2"], "unrecognized arguments: --workers"),
])
def test_sweep_settings_that_contradict_the_sweep_are_refused(tmp_path, capsys, args, words):
    import sweeps
    t0 = time.perf_counter()
    assert sweeps.main([*args, "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.strip().count("\n") <= 1, err
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 2
    if "--workers" in args:     # once: the tricks sweep sets the start per cell, so a shift for
        #                         its shifted cells is no contradiction
        assert sweeps.parse_args(["--preset", "tricks", "--shift", "2", "--outdir", str(tmp_path / "t")])


# ------------------------------------------- Issue 22: your own data, and other families

DATA_RUN = dict(K=8, m=3, steps=10, batch=64, n_init=2, log_every=5, quiet=True, workers=1,
                methods=["pca_lloyd", "manual_ste", "procrustes_lloyd"])


def _data_file(tmp_path, n=3000, D=8, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, D)) * np.linspace(2.0, 0.3, D) + 0.5).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    return str(tmp_path / "x.npy"), X


def test_a_data_file_is_mapped_split_by_seed_and_scored_on_its_test_rows(tmp_path, blank_plots):
    path, X = _data_file(tmp_path)
    s = vq.run_comparison(data=path, outdir=str(tmp_path / "out"), **DATA_RUN)
    c = s["config"]
    assert (c["D"], c["rank"], c["n_train"], c["n_eval"]) == (8, 8, 1800, 600)    # the data's, 60/20/20
    # the split, drawn again from its stream: disjoint, and the test rows are the population
    pick = vq.derived_rng(0, "split").choice(len(X), size=len(X), replace=False)
    test = np.sort(pick[2400:])
    r = s["results"]["pca_lloyd"]
    Xt = X[test].astype(np.float64)
    direct = np.sum((Xt - r["E"][vq.assign(Xt @ r["W"].T, r["E"])] @ r["W"]) ** 2, axis=1)
    assert r["pop_recon_mse"] == pytest.approx(direct.mean(), rel=1e-9) and s["bounds"]["n_pop"] == 600
    # the PCA floor of the test rows' own second moment, below every model
    lam = np.linalg.eigvalsh(Xt.T @ Xt / len(Xt))[::-1]
    assert s["bounds"]["pca_floor"] == pytest.approx(lam[3:].sum(), rel=1e-9)
    assert all(x["pop_recon_mse"] >= s["bounds"]["pca_floor"] for x in s["results"].values())
    assert not s["bounds"]["gaussian_floors"] and s["bounds"]["floor_name"] == "PCA floor"
    # the same array in memory, and the same array in an .npz (mapped): the same numbers
    np.savez(tmp_path / "x.npz", other=X[:5], x=X)
    assert isinstance(vq.open_data(str(tmp_path / "x.npz") + ":x"), np.memmap)
    for data in (X.copy(), str(tmp_path / "x.npz") + ":x"):
        t = vq.run_comparison(data=data, **DATA_RUN)
        assert [x.get("pop_recon_mse") for x in t["results"].values()] == \
               [x.get("pop_recon_mse") for x in s["results"].values()]
        assert t["data"]["sha256"] == s["data"]["sha256"]
    # summary.json names the data (path, shape, checksum) and does not hold it
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["config"]["data"] == path and saved["data"]["shape"] == [3000, 8]
    assert (tmp_path / "out" / "summary.json").stat().st_size < 100 * X.size
    other = vq.run_comparison(data=path, seed=1, **DATA_RUN)   # another seed, another split
    assert other["results"]["pca_lloyd"]["pop_recon_mse"] != r["pop_recon_mse"]


def _bad_npz(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((10, 2)), b=np.zeros((10, 2)))
    return str(tmp_path / "two.npz")


def _nan_rows(tmp_path):
    X = np.ones((500, 4))
    X[17, 2], X[300, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", X)
    return str(tmp_path / "nan.npy")


@pytest.mark.parametrize("make, extra, words", [
    (lambda t: str(t / "missing.npy"), [], "missing.npy: no such file"),
    (lambda t: (np.save(t / "c.npy", np.zeros((4, 3, 2))), str(t / "c.npy"))[1], [], "(4, 3, 2): must be 2-D"),
    (lambda t: (np.save(t / "i.npy", np.ones((50, 3), dtype=np.int64)), str(t / "i.npy"))[1], [],
     "dtype int64: must be floating point"),
    (_nan_rows, [], "2 rows with NaN or infinite values, the first at row 17"),
    (lambda t: (np.save(t / "s.npy", np.ones((20, 3))), str(t / "s.npy"))[1], ["--K", "16"], "20 rows: too few"),
    (lambda t: (np.save(t / "d.npy", np.ones((200, 3))), str(t / "d.npy"))[1], ["--D", "64"],
     "--D 64: but --data"),
    (lambda t: (np.save(t / "f.npy", np.ones((200, 3))), str(t / "f.npy"))[1], ["--family", "laplace"],
     "--family laplace: only matters without --data"),
    (lambda t: (np.save(t / "b.npy", np.ones((200, 3))), str(t / "b.npy"))[1], ["--fresh_batches", "1"],
     "--fresh_batches 1: only matters without --data"),
    (_bad_npz, [], "holds 2 arrays (a, b): name one"),
    (lambda t: (open(t / "junk.npy", "w").write("not an array"), str(t / "junk.npy"))[1], [],
     "not a .npy array file"),
])
def test_bad_data_is_one_line_exit_2_before_any_work(tmp_path, capsys, make, extra, words):
    spec = make(tmp_path)
    t0 = time.perf_counter()
    assert vq.main(["--data", spec, "--K", "4", "--m", "2", *extra, "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--" in err, err
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 2


def test_a_compressed_npz_too_large_for_memory_is_refused(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "z.npz", x=np.ones((1000, 4)))
    assert vq.open_data(str(tmp_path / "z.npz")).shape == (1000, 4)      # loaded: it fits
    monkeypatch.setattr(vq, "available_memory", lambda: 1000)
    with pytest.raises(vq.ConfigError, match="compressed, so it cannot be mapped"):
        vq.open_data(str(tmp_path / "z.npz"))


def test_families_have_the_covariance_they_declare_and_their_own_floors():
    lam, rng = np.array([3.0, 2.0, 1.5, 1.0]), np.random.default_rng(3)
    n = 200_000
    for family in vq.FAMILIES:
        S = vq.family_draw(family, rng, n, lam, 2)
        cov = S.T @ S / n
        assert np.allclose(cov, np.diag(lam), atol=6 * lam.max() * np.sqrt(2 / n) * 3)   # within sampling error
        kurt = (S ** 4).mean(axis=0) / lam ** 2              # 3 Gaussian, 6 Laplace, below 3 bimodal
        if family == "laplace":
            assert np.all(np.abs(kurt - 6) < 0.5)
        elif family == "mixture":                            # clusters from the m-th coordinate on
            c = vq.mixture_coordinates(4, 2)
            assert np.all(kurt[c] < 2) and np.all(np.abs(kurt[:c.start] - 3) < 0.2)
    # the Laplace source is easier than the Gaussian of its covariance: its Shannon lower
    # bound lies below the Gaussian's distortion-rate value
    assert vq.laplace_lower_bound(lam, 16) < vq.shannon_bound(lam, 16)
    s = vq.run_comparison(**{**TINY, "family": "laplace", "methods": ["manual_ste", "procrustes_lloyd"]})
    b = s["bounds"]
    assert b["source"] == "laplace" and b["floor"] == max(b["pca_floor"], b["laplace_lower_bound"])
    assert all(r["pop_recon_mse"] >= b["floor"] for r in s["results"].values())
    assert b["unconstrained_kmeans"] >= b["laplace_lower_bound"]    # no rank limit: only Shannon's bound
    text = vq.format_report(s)
    assert "What a Gaussian of the same second moment would allow" in text
    assert "Shannon lower bound of the Laplace source" in text.split("References")[0]


def test_sweeps_and_shards_run_on_a_data_file(tmp_path):
    path, _ = _data_file(tmp_path)
    args = ["--sweep", "start", "--start_values", "kmeans", "random", "--data", path, "--seeds", "2",
            "--steps", "8", "--K", "8", "--m", "3", "--n_init", "2", "--methods", "manual_ste", "--quiet"]
    for i in range(2):                                      # two shards, here in turn, then merged
        assert sweep_here(*args, "--outdir", str(tmp_path / "sh"), "--shard", f"{i}/2")[0] == 0
    assert sweep_here(*args, "--outdir", str(tmp_path / "sh"), "--merge")[0] == 0
    lines = [json.loads(x) for x in (tmp_path / "sh" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2 and all(ln["status"] == "ok" and ln["pop_recon_mse"] > ln["floor"] for ln in lines)
    assert {ln["floor_name"] for ln in lines} == {"PCA floor"}
    X = np.load(path)                                        # the file replaced under its name
    X[0, 0] += 1
    np.save(path, X)
    code, err = sweep_here(*args, "--outdir", str(tmp_path / "sh"), "--resume")
    assert code == 2 and "data_sha256" in err and err.count("\n") == 1, err
    quick = sweeps.parse_args(["--quick", "--data", path, "--outdir", str(tmp_path / "q")]).settings
    assert not {"D", "rank", "n_train", "n_eval", "batch"} & set(quick)     # the data's own sizes
    assert vq.build_config(quick, dependencies=False).D == 8


def test_a_part_of_the_test_rows_is_drawn_not_taken_in_file_order(tmp_path):
    path, X = _data_file(tmp_path)
    X = X[np.argsort(X[:, 0])]                               # a file sorted by its first column
    np.save(path, X)
    p = vq.make_problem(vq.make_config(data=path, **{k: v for k, v in DATA_RUN.items() if k != "methods"}))
    test = p.data.test
    parts = (p.data.train, p.data.eval, test)
    assert [len(x) for x in parts] == [1800, 600, 600] and len(np.unique(np.concatenate(parts))) == 3000
    draw, n = p.samples(np.random.default_rng(1), 50, "curves")
    S = draw(0, n)
    full = X[test].astype(np.float64) @ p.U
    gap = ((S[:, None, :] - full[None]) ** 2).sum(-1).min(axis=1)       # each drawn row is a test row
    assert n == 50 and gap.max() < 1e-20 * max(1.0, float((full ** 2).sum(1).max()))
    first = X[test[:50]].astype(np.float64) @ p.U
    assert abs(S[:, 0].mean() - first[:, 0].mean()) > 0 and not np.allclose(S, first)
    draw, n = p.samples(np.random.default_rng(1), 10 ** 6, "population")
    assert n == len(test) and np.allclose(draw(0, n), X[test].astype(np.float64) @ p.U)   # all, in order
