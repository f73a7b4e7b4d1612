"""Tests of vq_compare (and sweeps): why the numbers can be trusted.

Run with ``python -m pytest`` (this also runs the doctests of vq_compare.py).
Every check compares two independent computations, an invariant, or a case worked
out by hand; tolerances are stated next to each assert.
"""
import csv
import doctest
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import vq_compare as vq

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(D=12, rank=4, m=3, K=8, n_train=600, n_eval=300, steps=15, batch=64,
            n_pop=20000, n_init=2, log_every=5, outdir=None, quiet=True,
            workers=1)   # in this process: tests that patch functions see every call


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
def test_data_is_the_original_recipe_bit_for_bit(monkeypatch, block, n_train):
    monkeypatch.setattr(vq, "_DRAW_ROWS", block)         # drawn block by block, same numbers
    D, rank, n_eval, seed = 16, 3, 20, 7
    rng = np.random.default_rng(seed)                     # NOTES.md, written out again
    U, _ = np.linalg.qr(rng.normal(size=(D, rank)))
    lam = np.geomspace(4.0, 0.25, rank)
    Sigma = (U * lam) @ U.T
    Xt = rng.multivariate_normal(np.zeros(D), Sigma, size=n_train)
    Xe = rng.multivariate_normal(np.zeros(D), Sigma, size=n_eval)
    got = vq.make_lowrank_data(D, rank, n_train, n_eval, seed)
    for a, b in zip(got, (Xt, Xe, Sigma)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()   # signed zeros included
    U2, lam2 = vq.lowrank_factor(D, rank, seed)
    assert np.array_equal((U2 * lam2) @ U2.T, Sigma)


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
    rng = np.random.default_rng(hash((shape, estimator, alpha, beta, orthonormal)) % 2**32)
    W, E, X = random_point(rng, *shape, orthonormal=orthonormal)
    man = vq.manual_grads(W, E, X, alpha, beta, estimator)
    for fast in (True, False):
        fd = vq.fd_grads(W, E, X, alpha, beta, estimator, h=1e-5, fast=fast)
        assert vq.rel_err(fd.gW, man.gW) <= 1e-6
        if alpha > 0:
            assert vq.rel_err(fd.gE, man.gE) <= 1e-6
        else:
            assert np.abs(fd.gE).max() < 1e-8 and np.abs(man.gE).max() == 0
        assert abs(fd.loss - man.loss) <= 1e-12 * abs(man.loss)


def test_gradient_check_fails_on_a_wrong_gradient():
    """The comparison can fail: the original framework's codebook gradient (per-cluster
    mean instead of batch mean, NOTES.md defect 1) is caught."""
    rng = np.random.default_rng(3)
    W, E, X = random_point(rng, 100, 8, 3, 5)
    fd = vq.fd_grads(W, E, X, 1.0, 0.25)
    Z = X @ W.T
    labels = vq.assign(Z, E)
    counts, sums = vq.cluster_sums(Z, labels, 5)
    wrong_gE = 2 * (E - sums / np.maximum(counts, 1)[:, None])
    assert vq.rel_err(fd.gE, wrong_gE) > 0.5


def test_surrogate_forward_value_is_the_true_loss():
    rng = np.random.default_rng(4)
    for estimator in ("ste", "rotation"):
        W, E, X = random_point(rng, 80, 9, 3, 6)
        fr = vq.freeze(W, E, X, estimator)
        true = vq.loss_terms(W, E, X, 0.7, 0.3).total
        assert vq.surrogate_loss(W, E, X, fr, 0.7, 0.3) == pytest.approx(true, rel=1e-13)


def test_sufficient_statistics_evaluate_the_same_surrogate():
    rng = np.random.default_rng(5)
    W, E, X = random_point(rng, 70, 8, 3, 5)
    fr = vq.freeze(W, E, X, "ste")
    st = vq._ste_stats(X, fr, E)
    for _ in range(5):                                    # away from the freeze point too
        W2 = W + 0.3 * rng.normal(size=W.shape)
        E2 = E + 0.3 * rng.normal(size=E.shape)
        a = vq.surrogate_loss(W2, E2, X, fr, 1.3, 0.4)
        b = vq._ste_surrogate_from_stats(W2, E2, st, 1.3, 0.4)
        assert b == pytest.approx(a, rel=1e-12)
    idx = np.arange(W.size)                               # one entry of W moved at a time
    for delta in (0.7, -0.05):
        stack = np.repeat(W[None], W.size, axis=0).reshape(W.size, -1)
        stack[idx, idx] += delta
        direct = vq.surrogate_loss(stack.reshape((-1,) + W.shape), E, X, fr, 1.3, 0.4)
        fast = vq._ste_surrogate_W_entries(W, st, 1.3, 0.4, idx, delta)
        assert np.allclose(fast, direct, rtol=1e-12, atol=0)


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


def test_inverted_rotation_scale_is_caught():
    """The original framework's later scale ||z||/||q|| does not reproduce q: the
    forward check above fails for it, and so does the loss identity."""
    rng = np.random.default_rng(7)
    W, E, X = random_point(rng, 50, 7, 4, 6)
    fr = vq.freeze(W, E, X, "rotation")
    inverted = fr._replace(lam=1.0 / fr.lam)
    M = vq.rotation_matrices(inverted)
    assert not np.allclose(np.einsum("bij,bj->bi", M, fr.Z0), fr.Q0, atol=1e-6)
    true = vq.loss_terms(W, E, X, 1.0, 0.25).total
    assert abs(vq.surrogate_loss(W, E, X, inverted, 1.0, 0.25) - true) > 1e-6


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
        vq.loss_terms(W, E, X, 1.0, 0.5).total, rel=1e-13)
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
    # the training logs' shortcut (sum of ||x||^2 given, W orthonormal) is the same error
    fast = vq.metrics(W, E, X, x_sq=float(np.sum(X * X)))
    assert fast["recon_mse"] == pytest.approx(m["recon_mse"], rel=1e-12)
    shifted = vq.metrics(W, E, X, x_sq=float(np.sum(X * X)) + X.shape[0])  # it uses x_sq
    assert shifted["recon_mse"] == pytest.approx(m["recon_mse"] + 1, rel=1e-12)
    assert {k: v for k, v in fast.items() if k != "recon_mse"} == \
        {k: v for k, v in m.items() if k != "recon_mse"}


def test_tall_product_is_the_plain_product():
    rng = np.random.default_rng(2)
    for n, D, m in [(20000, 512, 16), (3000, 64, 4), (7, 3, 3)]:
        X, W = rng.standard_normal((n, D)), rng.standard_normal((m, D))
        P = vq.tall_product(X, W)
        assert P.shape == (n, m) and P.flags.c_contiguous
        assert np.abs(P - X @ W.T).max() <= 1e-13 * np.abs(X @ W.T).max()


# ---------------------------------------------------------------- k-means

def test_lloyd_by_hand_exact_centres_and_inertia():
    Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [10.0, 2.0]])
    r = vq.lloyd_run(Z, np.array([[0.0, 3.0], [7.0, 0.0]]), max_iter=10)
    # first assignment: (0,0),(0,1) -> 0 and the rest -> 1; means (0, .5), (10, 1)
    assert np.array_equal(r.E, np.array([[0.0, 0.5], [10.0, 1.0]]))
    assert np.array_equal(r.labels, [0, 0, 1, 1, 1])
    assert r.inertia == 0.25 + 0.25 + 1.0 + 0.0 + 1.0


def test_kmeans_by_hand():
    Z = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    r = vq.kmeans_run(Z, 2, seed=3, n_init=3)
    assert np.array_equal(r.E[np.argsort(r.E[:, 0])], [[0.0, 0.5], [10.0, 0.5]])
    assert r.inertia == 1.0


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    Z = np.array([[0.0], [1.0], [2.0], [10.0]])
    E, labels = vq.lloyd(Z, np.array([[1.0], [100.0]]), max_iter=10)
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
        r = vq.lloyd_run(Z, E0, max_iter=300)
        p = vq.lloyd_plain(Z, E0, max_iter=300)
        assert r.inertia <= start
        # the bounds skip work, never change it: the same centres, bit for bit
        assert np.array_equal(r.labels, p.labels) and np.array_equal(r.E, p.E)
        assert r.E.dtype == dtype and r.n_iter == p.n_iter
        assert r.inertia == pytest.approx(p.inertia, rel=1e-12)


def test_float32_screening_gives_the_float64_labels_even_at_near_ties():
    # Codes 0 and 1 are 0.01 apart; half the points sit within 1e-7 of their bisector,
    # where float32 cannot tell the two codes apart (rounding ~1e-5 on these distances)
    # and only the float64 recheck gets the float64 answer; the rest are ordinary.
    rng = np.random.default_rng(41)
    K, m, n = 4 * vq._SCREEN_K, 6, 4000
    E = rng.normal(size=(K, m)) * 10
    u = rng.normal(size=m)
    u /= np.linalg.norm(u)
    E[1] = E[0] + 0.01 * u
    near = (E[0] + E[1]) / 2 + 0.01 * rng.uniform(-1e-7, 1e-7, size=(n // 2, 1)) * u
    noise = 1e-3 * rng.normal(size=near.shape)
    near += noise - np.outer(noise @ u, u)                 # along the bisector: still a near tie
    Z = np.vstack([near, rng.normal(size=(n // 2, m)) * 10])
    labels, d1, d2 = vq.nearest(Z, E, second=True)         # second=True: float64 throughout
    assert 0.2 < np.mean(labels[:n // 2] == 1) < 0.8       # both codes win somewhere
    assert np.array_equal(vq.nearest(Z, E, with_dist=False), labels)   # screened
    lab, dist = vq.nearest(Z, E)
    assert np.array_equal(lab, labels) and np.allclose(dist, d1, rtol=1e-12, atol=1e-9)
    z_max = float(np.max(np.sum(Z * Z, axis=1)))
    lab, b1, b2, eps = vq._nearest_bounded(Z, E, z_max)
    assert np.array_equal(lab, labels)
    assert np.all(np.abs(b1 - d1) <= eps) and np.all(np.abs(b2 - d2) <= eps)
    assert eps < 1e-2 * np.median((d2 - d1)[n // 2:])      # bounds that still prune
    # scales float32 cannot hold (overflow) or resolve (subnormals): float64 alone
    for scale in (1e20, 1e-18, 1e-25):
        labels = vq.nearest(Z * scale, E * scale, second=True)[0]
        assert np.array_equal(vq.nearest(Z * scale, E * scale, with_dist=False), labels), scale


def test_row_sums_by_label_are_np_add_at_bit_for_bit():
    rng = np.random.default_rng(43)
    for dtype in (np.float64, np.float32):
        X = (rng.normal(size=(3000, 37)) * 10.0 ** rng.integers(-4, 4, size=37)).astype(dtype)
        X[rng.random(size=X.shape) < 0.05] = -0.0          # signed zeros too
        labels = rng.integers(0, 50, size=3000)
        labels[labels == 7] = 8                            # an empty label
        S = np.zeros((50, 37))
        np.add.at(S, labels, X)
        assert vq.row_sums_by_label(X, labels, 50).tobytes() == S.tobytes()


def test_kmeans_bad_K_is_a_clear_error():
    with pytest.raises(ValueError, match="n_samples=3 should be >= K=5"):
        vq.kmeans(np.zeros((3, 2)), 5)


def test_assignment_in_chunks_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(10)
    Z, E = rng.normal(size=(3001, 3)), rng.normal(size=(17, 3))
    monkeypatch.setattr(vq, "_CHUNK_ELEMS", 17 * 100)    # force many chunks
    labels, dist, dist2 = vq.nearest(Z, E, second=True)
    D2 = ((Z[:, None, :] - E[None]) ** 2).sum(-1)
    assert np.array_equal(labels, D2.argmin(1))
    assert np.allclose(dist, D2.min(1), atol=1e-12)
    assert np.allclose(dist2, np.sort(D2, axis=1)[:, 1], atol=1e-12)


# ---------------------------------------------------------------- methods

def test_fd_ste_follows_manual_ste():
    out = vq.run_comparison(**{**TINY, "steps": 40, "methods": ["fd_ste", "manual_ste"]})
    a, b = out["results"]["fd_ste"], out["results"]["manual_ste"]
    for k in vq._METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
    assert np.abs(a["W"] - b["W"]).max() < 1e-7
    assert out["fd_vs_manual"]["max_rel_metric_diff"] < 1e-6


def test_W_keeps_orthonormal_rows_after_every_step(monkeypatch):
    worst = []
    step = vq.riemannian_step

    def checked(W, G, lr):
        W_new = step(W, G, lr)
        worst.append(np.abs(W_new @ W_new.T - np.eye(W.shape[0])).max())
        return W_new
    monkeypatch.setattr(vq, "riemannian_step", checked)
    vq.run_comparison(**{**TINY, "methods": ["manual_ste", "rotation", "ema_ste"]})
    assert len(worst) == 3 * TINY["steps"]
    assert max(worst) < 1e-10


def test_procrustes_lloyd_never_increases_the_training_error():
    X, _, _ = vq.make_lowrank_data(20, 5, 2000, 10, seed=3)
    W0 = vq.pca_encoder(X, 3)
    E0 = vq.kmeans(X @ W0.T, 16, seed=1, n_init=1, max_iter=5)[0]   # a poor start
    W, E, hist = vq.procrustes_lloyd(X, W0, E0, max_rounds=200, tol=0)
    assert len(hist) > 5
    assert np.all(np.diff(hist) <= 1e-12 * hist[0])
    assert hist[-1] < hist[0]
    assert np.abs(W @ W.T - np.eye(3)).max() < 1e-12
    m = vq.metrics(W, E, X)                                # the logged error is the real one
    assert m["recon_mse"] == pytest.approx(hist[-1], rel=1e-10)


def _procrustes_lloyd_plain(X, W, E, max_rounds, tol):
    """procrustes_lloyd as its docstring states it, with a full reassignment every round."""
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
def test_procrustes_lloyd_skips_only_reassignments_that_cannot_change(dtype):
    # the bounds skip points that keep their code; the trajectory is that of full passes
    for seed, (D, r, m, K, n) in enumerate([(20, 5, 3, 16, 2000), (64, 6, 4, 32, 5000),
                                            (30, 8, 2, 50, 3000)]):
        X = vq.make_lowrank_data(D, r, n, 10, seed=seed)[0].astype(dtype)
        W0 = vq.pca_encoder(X, m)
        E0 = vq.kmeans(X @ W0.T, K, seed=1, n_init=1, max_iter=5)[0].astype(dtype)   # a poor start
        W, E, hist = vq.procrustes_lloyd(X, W0, E0, max_rounds=60, tol=-1.0)   # never stops early
        Wp, Ep, histp = _procrustes_lloyd_plain(X, W0, E0, 60, -1.0)
        assert len(hist) == len(histp) == 61
        tol = 1e-10 if dtype == np.float64 else 1e-4
        assert np.abs(W - Wp).max() <= tol and np.abs(E - Ep).max() <= tol * np.abs(Ep).max()
        assert np.array_equal(vq.assign(X @ W.T, E), vq.assign(X @ Wp.T, Ep))
        assert np.allclose(hist, histp, rtol=tol)


def test_ema_codebook_converges_to_cluster_means():
    rng = np.random.default_rng(11)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    Z = np.concatenate([c + 0.3 * rng.normal(size=(40, 2)) for c in centres])
    labels = np.repeat([0, 1, 2], 40)
    means = np.array([Z[labels == j].mean(0) for j in range(3)])
    E = centres + 1.0                                       # start away from the means
    state = vq.EmaState.zeros(3, 2)
    for _ in range(300):
        E, _ = vq.ema_codebook_update(E, state, Z, vq.assign(Z, E), decay=0.9, eps=0.0)
    assert np.allclose(E, means, atol=1e-12)
    state = vq.EmaState.zeros(3, 2)                         # with smoothing: within O(eps)
    E2 = centres.copy()
    for _ in range(300):
        E2, _ = vq.ema_codebook_update(E2, state, Z, vq.assign(Z, E2), decay=0.9, eps=1e-5)
    assert np.allclose(E2, means, rtol=1e-5, atol=1e-5)


def test_ema_dead_code_is_reseeded_from_the_batch():
    rng = np.random.default_rng(12)
    Z = rng.normal(size=(50, 2))
    E = np.array([[0.0, 0.0], [100.0, 100.0]])              # code 1 is never used
    state = vq.EmaState.zeros(2, 2)
    E_new, n = vq.ema_codebook_update(E, state, Z, vq.assign(Z, E), 0.9, 1e-5,
                                      dead_threshold=1.0, rng=np.random.default_rng(0))
    assert n == 1
    assert any(np.array_equal(E_new[1], z) for z in Z)       # a latent of this batch
    E_same, n0 = vq.ema_codebook_update(E, vq.EmaState.zeros(2, 2), Z, vq.assign(Z, E), 0.9)
    assert n0 == 0 and np.array_equal(E_same[1], E[1])       # off by default: kept


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
    pop = vq.population_errors({"vq": (W, E), "uncon": C}, U, lam, 5000,
                               np.random.default_rng(5), chunk=777)
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


def test_same_settings_give_the_same_summary(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    vq.run_comparison(**{**TINY, "outdir": str(a)})
    vq.run_comparison(**{**TINY, "outdir": str(b)})
    ja = json.loads((a / "summary.json").read_text())
    jb = json.loads((b / "summary.json").read_text())
    assert ja["config"].pop("outdir") != jb["config"].pop("outdir")
    assert _strip_times(ja) == _strip_times(jb)
    assert sorted(os.listdir(a)) == sorted(["summary.json", "comparison.png", "training_curves.png"]
                                           + [f"{m}_logs.json" for m in vq.ALL_METHODS[1:]])
    assert set(ja["results"]) == set(vq.ALL_METHODS)
    for r in ja["results"].values():
        assert {"recon_mse", "in_sub_dist", "usage_entropy", "dead_frac", "perplexity",
                "seconds", "pop_recon_mse", "pop_recon_se", "subspace_angle_deg"} <= set(r)
    logs = json.loads((a / "procrustes_lloyd_logs.json").read_text())
    assert np.all(np.diff(logs["train_recon_mse"]) <= 1e-12)


def test_another_method_does_not_change_a_methods_numbers():
    one = vq.run_comparison(**{**TINY, "methods": ["manual_ste"]})
    two = vq.run_comparison(**{**TINY, "methods": ["rotation", "manual_ste"]})
    assert one["results"]["manual_ste"]["recon_mse"] == two["results"]["manual_ste"]["recon_mse"]


@pytest.mark.parametrize("workers", [1, 2])                 # here, and in worker processes
def test_diverging_method_is_reported_and_others_finish(tmp_path, workers):
    out = vq.run_comparison(**{**TINY, "lrE": 1e150, "outdir": str(tmp_path), "workers": workers,
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
       (["--ema_decay", "1"], "--ema_decay 1.0")]


@pytest.mark.parametrize("args,named", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, named):
    out = tmp_path / "out"
    p = run_cli(*args, "--outdir", str(out), cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in p.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_outdir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    p = run_cli("--outdir", str(tmp_path / "file" / "sub"), cwd=tmp_path)
    assert p.returncode == 2 and "--outdir" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_runs_and_writes_its_outputs(tmp_path):
    p = run_cli("--D", "12", "--rank", "4", "--m", "3", "--K", "8", "--n_train", "600",
                "--n_eval", "300", "--steps", "10", "--batch", "64", "--n_pop", "10000",
                "--n_init", "2", "--outdir", "res", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "SUMMARY" in p.stdout and "Procrustes-Lloyd" in p.stdout
    files = os.listdir(tmp_path / "res")
    assert "summary.json" in files and not any(f.startswith(".tmp") for f in files)
    with open(tmp_path / "res" / "comparison.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_help_explains_every_flag():
    p = run_cli("--help", cwd=HERE)
    assert p.returncode == 0
    for f in vq.dataclasses.fields(vq.Config):
        assert f"--{f.name}" in p.stdout


def test_cli_forces_a_non_interactive_backend(tmp_path):
    code = ("import sys; sys.path.insert(0, %r); import vq_compare, matplotlib; "
            "assert vq_compare.main(['--D', '8', '--rank', '3', '--m', '2', '--K', '4', "
            "'--n_train', '300', '--n_eval', '100', '--steps', '3', '--batch', '32', "
            "'--n_pop', '1000', '--quiet', '--outdir', %r]) == 0; "
            "print(matplotlib.get_backend())") % (HERE, str(tmp_path / "out"))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "MPLBACKEND": "TkAgg"}, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().lower() == "agg"
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 1000


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


def run_sweeps(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "sweeps.py"), *args],
                          capture_output=True, text=True, timeout=300)


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


def test_tiny_sweep_end_to_end_and_jobs_do_not_change_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pa = run_sweeps("--sweep", "all", "--outdir", str(a), "--jobs", "1", *SWEEP_ARGS)
    pb = run_sweeps("--sweep", "all", "--outdir", str(b), "--jobs", "2", *SWEEP_ARGS)
    assert pa.returncode == 0 and pb.returncode == 0, pa.stderr + pb.stderr
    ra, rb = (a / "results.jsonl").read_text(), (b / "results.jsonl").read_text()
    assert ra == rb
    lines = [json.loads(x) for x in ra.splitlines()]
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
    ver = next(ln for ln in lines if ln["method"] == "fd_vs_manual")
    assert max(ver["gW_rel_err"]) < 1e-6 and max(ver["recon_rel_diff"]) < 1e-6
    for sweep in ("K", "beta", "steps", "verify"):
        assert (a / f"sweep_{sweep}.png").stat().st_size > 1000


def test_resume_after_interruption_gives_the_same_lines(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--sweep", "K", *SWEEP_ARGS]
    assert run_sweeps("--outdir", str(full), *args).returncode == 0
    text = (full / "results.jsonl").read_text()
    cut.mkdir()
    (cut / "sweep_config.json").write_text((full / "sweep_config.json").read_text())
    lines = text.splitlines(keepends=True)
    (cut / "results.jsonl").write_text("".join(lines[:4]) + lines[4][:25])   # killed mid-line
    p = run_sweeps("--outdir", str(cut), "--resume", *args)
    assert p.returncode == 0, p.stderr
    assert (cut / "results.jsonl").read_text() == text


SWEEP_BAD = [(["--K_values"], "--K_values"), (["--K_values", "x"], "--K_values"),
             (["--beta_values", "0", "abc"], "--beta_values"), (["--K_values", "99999"], "--K 99999"),
             (["--sweep", "gamma"], "--sweep"), (["--methods", "nope"], "--methods nope"),
             (["--seeds", "0"], "--seeds 0"), (["--jobs", "-1"], "--jobs -1")]


@pytest.mark.parametrize("args,named", SWEEP_BAD)
def test_sweep_bad_input_exits_2_and_writes_nothing(tmp_path, args, named):
    p = run_sweeps("--outdir", str(tmp_path / "o"), *args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and named in p.stderr
    assert not (tmp_path / "o").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "o"
    assert run_sweeps("--sweep", "beta", "--outdir", str(out), *SWEEP_ARGS).returncode == 0
    before = sorted(os.listdir(out))
    stamp = (out / "results.jsonl").read_text()
    p = run_sweeps("--sweep", "beta", "--outdir", str(out), "--resume", *SWEEP_ARGS, "--lrW", "0.01")
    assert p.returncode == 2 and "lrW" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == before and (out / "results.jsonl").read_text() == stamp
    p = run_sweeps("--sweep", "beta", "--outdir", str(out), *SWEEP_ARGS)     # no --resume
    assert p.returncode == 2 and "--resume" in p.stderr


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
    assert vq.lloyd(Z, E, 10)[0].dtype == np.float32
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
    chk = vq.gradient_check(W, E, X, 1.0, 0.25, "rotation", n_coords=50, rng=rng)
    assert chk["coords"] == 100
    assert chk["gW_rel_err"] < 1e-6 and chk["gE_rel_err"] < 1e-6
    fd = vq.fd_grads(W, E, X, 1.0, 0.25, coords=(np.array([0, 5]), np.array([3])))
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
    assert labels[int(np.argmax(left.get_yticks()))] == vq.LABELS["pca_lloyd"]   # top row: baseline


def test_per_method_plots_flag(tmp_path):
    vq.run_comparison(**{**TINY, "steps": 5, "outdir": str(tmp_path), "per_method_plots": True,
                         "methods": ["manual_ste", "rotation"]})
    assert (tmp_path / "manual_ste.png").exists() and (tmp_path / "rotation.png").exists()


# ---------------------------------------------------------------- worker processes

def test_worker_processes_do_not_change_results():
    rng = np.random.default_rng(22)
    Z = rng.normal(size=(3000, 3))
    a = vq.kmeans_run(Z, 12, seed=5, n_init=4, workers=1)
    b = vq.kmeans_run(Z, 12, seed=5, n_init=4, workers=2)
    assert np.array_equal(a.E, b.E) and a.inertia == b.inertia
    # the methods, the reference and the gradient checks run on the workers too (one
    # BLAS thread there, several here); at the default batch and D, where BLAS threads
    # (a threaded dot product rounded by thread count; the loss no longer uses one)
    for settings in (TINY, {**TINY, "D": 64, "rank": 6, "m": 4, "K": 32, "n_train": 3000,
                            "batch": 1024, "steps": 8, "log_every": 4}):
        here = vq.run_comparison(**{**settings, "workers": 1})
        there = vq.run_comparison(**{**settings, "workers": 2})
        for name, r in here["results"].items():            # trained models and their logs
            assert np.array_equal(r["W"], there["results"][name]["W"])
            assert np.array_equal(r["E"], there["results"][name]["E"])
            assert r["logs"] == there["results"][name]["logs"]
        one, two = vq._json_ready(here), vq._json_ready(there)
        assert one["config"].pop("workers") == 1 and two["config"].pop("workers") == 2
        assert _strip_times(one) == _strip_times(two)


def test_threads_for_big_data_do_not_change_results(monkeypatch):
    # above _BIG_DATA the methods and the population run on threads of this process
    # (one BLAS thread each), where this BLAS allows it; the same numbers as in turn
    import threading
    used = set()
    apply = vq._apply

    def recorded(fn, *args):
        used.add(threading.get_ident())
        return apply(fn, *args)
    settings = {**TINY, "D": 64, "rank": 6, "m": 4, "K": 256, "n_train": 3000, "batch": 1024,
                "steps": 8, "log_every": 4}                # K: codes screened in float32
    small = vq.run_comparison(**{**settings, "workers": 2})   # worker processes
    monkeypatch.setattr(vq, "_apply", recorded)
    monkeypatch.setattr(vq, "_BIG_DATA", 0)
    one = vq.run_comparison(**{**settings, "workers": 1})
    assert len(used) == 1
    two = vq.run_comparison(**{**settings, "workers": 2})
    if vq._blas_thread_setter() is not None:               # OpenBLAS 0.3.27+, as numpy's wheels
        assert len(used) > 2                               # the second run used two more threads
    for name, r in one["results"].items():
        assert np.array_equal(r["W"], two["results"][name]["W"])
        assert np.array_equal(r["E"], two["results"][name]["E"])
        assert r["logs"] == two["results"][name]["logs"]
    a, b, c = vq._json_ready(one), vq._json_ready(two), vq._json_ready(small)
    a["config"].pop("workers"), b["config"].pop("workers"), c["config"].pop("workers")
    assert _strip_times(a) == _strip_times(b)
    # threads score the finished models' population errors while others train: the
    # same bounds as the processes' run, which scores them all at the end
    assert _strip_times(b) == _strip_times(c)
    if vq._blas_thread_setter() is None:
        return
    # a method that ends after that batch started scores its own, with the same result
    import time as _time
    batches, slow = [], vq.METHODS["manual_ste"]
    monkeypatch.setitem(vq.METHODS, "manual_ste", lambda p: (_time.sleep(1.0), slow(p))[1])
    columns = vq.population_columns
    monkeypatch.setattr(vq, "population_columns", lambda models, *a, **k: (
        batches.append(sorted(models)), columns(models, *a, **k))[1])
    late = vq._json_ready(vq.run_comparison(**{**settings, "workers": 2}))
    late["config"].pop("workers")
    assert ["manual_ste"] in batches and len(batches) == 2
    assert _strip_times(late) == _strip_times(c)


def test_run_threads_uses_threads_only_where_they_do_not_fight(monkeypatch):
    import threading
    main = threading.get_ident()

    def who():
        time.sleep(0.05)                                   # long enough for both threads to start
        return threading.get_ident()
    ids = vq.run_threads(who, [()] * 4, 2)
    if vq._blas_thread_setter() is not None:
        assert main not in ids and len(set(ids)) == 2
    else:                                                  # two BLAS pools would fight: in turn
        assert ids == [main] * 4
    monkeypatch.setenv("VQ_COMPARE_WORKER", "1")           # a worker process: the cores are taken
    assert vq.run_threads(who, [()] * 4, 2) == [main] * 4


def test_methods_cannot_write_into_the_shared_problem(monkeypatch):
    # tasks share the problem's arrays (threads next to big data): writing raises
    def rogue(problem):
        problem.E0[0] += 1.0
    monkeypatch.setitem(vq.METHODS, "manual_ste", rogue)
    with pytest.raises(ValueError, match="read-only"):
        vq.run_comparison(**{**TINY, "methods": ["pca_lloyd", "manual_ste"]})


def test_population_errors_do_not_depend_on_threads():
    rng = np.random.default_rng(31)
    U = np.linalg.qr(rng.normal(size=(20, 5)))[0]
    lam = np.geomspace(4.0, 0.25, 5)
    models = {"a": (vq.stiefel_project(rng.normal(size=(3, 20))), rng.normal(size=(9, 3))),
              "b": rng.normal(size=(9, 5))}
    pops = [vq.population_errors(models, U, lam, 10_001, np.random.default_rng(2), chunk=1000,
                                 threads=t) for t in (1, 2, 3)]
    for p in pops[1:]:
        assert np.array_equal(p.mean, pops[0].mean) and np.array_equal(p.cov, pops[0].cov)
    # models scored in an earlier batch (the CLI's, while other methods train) change nothing
    rng = np.random.default_rng(2)
    early = vq.population_columns({"b": models["b"]}, U, lam, 10_001, rng, chunk=1000)
    assert rng.bit_generator.state == np.random.default_rng(2).bit_generator.state   # not advanced
    p = vq.population_errors(models, U, lam, 10_001, rng, chunk=1000, threads=2, columns=early)
    assert np.array_equal(p.mean, pops[0].mean) and np.array_equal(p.cov, pops[0].cov)
    early["b"] = early["b"] + 1.0                          # they are used, not recomputed
    p = vq.population_errors(models, U, lam, 10_001, rng, chunk=1000, columns=early)
    assert p.mean[1] == pytest.approx(pops[0].mean[1] + 1.0, rel=1e-12)


def test_big_arrays_reach_workers_through_a_file_and_give_the_same_result():
    rng = np.random.default_rng(23)
    Z = rng.normal(size=(80_000, 2))                      # 1.3 MB: sent as a mapped file
    assert Z.nbytes > vq._FILE_BYTES
    def scratch():
        dirs = [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
        return {os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.startswith("vq_compare_")}
    before = scratch()
    a = vq.kmeans_run(Z, 6, seed=4, n_init=2, max_iter=30, workers=1)
    b = vq.kmeans_run(Z, 6, seed=4, n_init=2, max_iter=30, workers=2)
    assert np.array_equal(a.E, b.E) and a.inertia == b.inertia
    assert scratch() == before                             # cleaned up
    # arrays put in a file by the caller (next to big data) reach workers, or this
    # process, mapped; the files go with the block
    for workers in (1, 2):
        with vq._spilled(True, Z.nbytes) as put:
            f = put(Z)
            assert isinstance(f, vq._InFile) and os.path.exists(f.path)
            runs = vq.run_tasks(vq._restart, vq._restart_tasks(f, 6, 4, 2, 30), workers)
        assert np.array_equal(vq._best(runs).E, a.E) and not os.path.exists(f.path)
    assert scratch() == before


def test_scratch_files_avoid_a_full_dev_shm(monkeypatch):
    usage = type("Usage", (), {"free": 64 << 20})
    monkeypatch.setattr(vq.shutil, "disk_usage", lambda path: usage)
    assert vq._scratch_dir(1 << 20) == "/dev/shm"
    assert vq._scratch_dir(100 << 20) is None              # the usual temporary directory


def test_the_cli_starts_its_worker_processes_once(tmp_path, monkeypatch):
    import concurrent.futures
    started = []

    class Counted(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            started.append(1)
            super().__init__(*a, **k)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Counted)
    vq._shutdown_pool()
    flags = [f"--{k}={v}" for k, v in TINY.items() if k not in ("outdir", "quiet", "workers")]
    assert vq.main(flags + ["--workers", "2", "--quiet", "--outdir", str(tmp_path / "out")]) == 0
    vq._shutdown_pool()
    assert started == [1]                                  # start point, then the methods' batch


def test_a_batch_can_grow_once_its_first_tasks_are_done():
    tasks = [(operator.mul, 2, 3), (operator.mul, 4, 5), (operator.mul, 6, 7)]
    seen = []

    def more(first):                                       # called with the first two results
        seen.append(first)
        return [(operator.add, first[0], first[1])]
    for workers in (1, 2):
        assert vq.run_tasks(vq._apply, tasks, workers, then=(2, more)) == [6, 20, 42, 26]
    assert seen == [[6, 20], [6, 20]]


@pytest.mark.parametrize("workers", [1, 2])
def test_start_point_and_reference_equal_their_definitions(workers):
    # make_problem runs the restarts of both in one batch (and the reference's start from
    # the lifted baseline as soon as the baseline is known); the results must be those of
    # kmeans() on the PCA latents and of unconstrained_reference() on its own
    cfg = vq.make_config(**{**TINY, "n_init": 3, "workers": workers})
    p = vq.make_problem(cfg)
    X_train, _, _ = vq.make_lowrank_data(cfg.D, cfg.rank, cfg.n_train, cfg.n_eval, cfg.seed)
    W0 = vq.pca_encoder(X_train, cfg.m)
    E0, _ = vq.kmeans(X_train @ W0.T, cfg.K, vq.derived_rng(cfg.seed, "kmeans"), 3, cfg.kmeans_iter)
    assert np.array_equal(p.W0, W0) and np.array_equal(p.E0, E0)
    alone = vq.Problem(cfg, p.X_train, p.X_eval, p.U, p.lam, p.W0, p.E0, 0.0)
    C, err, _ = vq.unconstrained_reference(alone)
    assert np.array_equal(C, p.reference[0]) and err == p.reference[1]
    # left to compare(), the reference runs in the methods' batch: the same again
    later = vq.make_problem(cfg, reference=False)
    assert later.reference is None
    summary = vq.compare(later)
    assert np.array_equal(later.reference[0], C) and later.reference[1] == err
    assert summary["bounds"]["unconstrained_kmeans_eval"] == err
    # never worse on the training data than the rank-m baseline it can start from
    S = X_train @ p.U
    lifted = E0 @ (W0 @ p.U)
    assert vq.nearest(S, C)[1].sum() <= vq.nearest(S, lifted)[1].sum() * (1 + 1e-12)


def test_a_script_without_main_guard_runs_once(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nimport vq_compare\nprint('ran')\n"
        "vq_compare.run_comparison(D=8, rank=3, m=2, K=4, n_train=300, n_eval=100, steps=3,"
        " batch=32, n_pop=1000, n_init=4, outdir=None, quiet=True, workers=2)\n" % HERE)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ran"] and p.stderr == ""


# ---------------------------------------------------------------- properties (hypothesis)

from hypothesis import given, settings, strategies as st  # noqa: E402


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
    r = vq.lloyd_run(Z, E0, max_iter=100)
    assert r.inertia <= vq.nearest(Z, E0)[1].sum() * (1 + 1e-12) + 1e-12
    labels, dist = vq.nearest(Z, r.E)
    assert np.array_equal(labels, r.labels) and dist.sum() == pytest.approx(r.inertia, rel=1e-12, abs=1e-12)
