"""sweeps: seeded sweeps of vq_compare over K, beta, start, shift, learning rate and
training length, and every method from every start (tricks), each method at tuned rates
if asked, with confidence intervals, resumable.

    python sweeps.py --sweep K --seeds 5 --jobs 2 --outdir sweeps_out
    python sweeps.py --quick                 # a small grid, a smoke run in seconds
    python sweeps.py --preset original       # the original framework's comprehensive set
    python sweeps.py --preset tricks --quick # tuned rates, ablations, every seed drawn
    python sweeps.py --preset fang2025 --quick   # a published study, curve against curve

Every (cell, seed) is one vq_compare run: each seed draws new data and new batches. One
line per finished (cell, seed, method) goes to ``DIR/results.jsonl`` as soon as it is
known, so an interrupted sweep loses nothing and ``--resume`` finishes it; the file ends
sorted, the same however often the sweep was resumed. The k-means restarts of every
problem run first, on ``--jobs`` processes; the cells follow on the same processes.
With ``--tune`` every method's rates are first chosen per cell on seeds of their own
(``Tuner``). ``DIR/summary.csv`` aggregates per cell and method: mean, standard
deviation, 95% confidence interval (Student t over seeds) and the paired differences to
``pca_lloyd`` and to ``manual_ste``. Any other vq_compare flag sets the fixed value of
the parameters not swept.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import itertools
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections import Counter

import numpy as np

import vq_compare as vq

# The swept settings with a grid of values: flag --<name>_values, type, default grid, axis label.
GRIDS = {"K": (int, [8, 16, 32, 64], "codebook size K"),
         "beta": (float, [0.0, 0.1, 0.25, 0.5, 1.0], "commitment weight beta"),
         "start": (str, list(vq.START_REGIMES), "start regime of the trained methods"),
         "shift": (float, [0.0, 1.0, 2.0, 4.0, 8.0], "shift of the codes' start (latent sd)"),
         "lr": (float, [1.0, 0.25, 0.0625], "scale on both learning rates")}
# "tricks": every combination of --start_values, --K_values and full / codebook-only training
SWEEPS = tuple(GRIDS) + ("tricks", "steps", "verify")
# What each sweep and preset does, for --help (a test checks that every one is explained)
SWEEP_HELP = {
    "K": "the codebook size over --K_values",
    "beta": "the commitment weight over --beta_values",
    "start": "the trained methods' start regime over --start_values (kmeans, random_codes, shifted, random)",
    "shift": "the shifted start's offset over --shift_values (latent standard deviations; needs --start "
             "shifted)",
    "lr": "both learning rates (lrW and lrE) scaled by each of --lr_values",
    "tricks": "every method from every start in --start_values at every K in --K_values, with the encoder "
              "trained and fixed (codebook only): sweep_tricks.png draws every seed",
    "steps": "one run of --steps_max steps scored every --steps_every steps: the population error along "
             "training (paired with PCA + Lloyd's on the same fresh samples)",
    "verify": "fd_ste and manual_ste trained side by side by the one loop for --steps steps: the gradients' "
              "difference at every step and how far the two runs drift apart"}
TRAINING = {"full": 1, "codes": 0}                          # --train_encoder of a tricks cell
RESULTS, CONFIG, SUMMARY, TUNING = "results.jsonl", "sweep_config.json", "summary.csv", "tuning.json"
SCORE_KEYS = ("recon_mse", "in_sub_dist", "usage_entropy", "dead_frac", "perplexity",
              "subspace_angle_deg", "pop_recon_mse", "pop_recon_se", "entropy_bound")

QUICK = dict(K_values=[8, 16], beta_values=[0.0, 0.5], steps_max=60, steps_every=20, seeds=2,
             D=32, rank=5, m=3, K=16, n_train=3000, n_eval=1000, steps=60, batch=256,
             n_pop=50_000, n_init=2, methods=["pca_lloyd", "manual_ste", "rotation"])
# The original framework's comprehensive run: K sweep and beta sweep at 300 steps, a
# 500-step convergence run and an STE verification, one seed (42).
ORIGINAL = dict(sweep=["K", "beta", "steps", "verify"], K_values=[8, 16, 32, 64], beta_values=[0.0, 0.1, 0.25, 0.5, 1.0],
                steps=300, steps_max=500, steps_every=25, seeds=1, seed=42,
                methods=["pca_lloyd", "fd_ste", "manual_ste", "rotation"])
# Codebook collapse (Fang et al. 2025's shifted-Gaussian simulation, in 8 dimensions):
# isotropic latents, the encoder fixed, codes started off the data by --shift latent sd.
COLLAPSE = dict(sweep=["shift"], shift_values=[0.0, 1.0, 2.0, 4.0, 8.0], seeds=5, start="shifted",
                train_encoder=0, D=8, rank=8, m=8, lmax=1.0, lmin=1.0, K=256)
# Every method from every start regime at three codebook sizes, with and without training
# the encoder: which trick helps, and where.
TRICKS = dict(sweep=["tricks"], start_values=list(vq.START_REGIMES), K_values=[16, 64, 256], seeds=10,
              methods=list(vq.METHODS), ablations=True, tune=True)
# Fang et al. 2025's shifted-Gaussian simulation, as their script runs it (VQ-Research/
# Wasserstein-VQ SimulationAnalyses/DistributionalMatchingPerspective/GaussianDistribution/
# VariousVQs.py): latents N(mu 1, I_8), codes N(0, I), the codebook alone trained by SGD with
# momentum 0.9 on fresh batches of 50,000, metrics every 100 steps on 200,000 fresh samples;
# their five quantizers at their rates (FANG_QUANTIZERS). Their mu is our shift. The
# training set only feeds the start's PCA and the k-means reference (batches are fresh).
FANG = dict(sweep=["shift"], shift_values=[float(mu) for mu in range(9)], seeds=1, start="shifted",
            train_encoder=0, D=8, rank=8, m=8, lmax=1.0, lmin=1.0, K=16384, n_train=20_000, n_eval=2000,
            batch=50_000, steps=2000, fresh_batches=1, optimizer="momentum", momentum=0.9, alpha=1.0,
            eval_every=100, eval_samples=200_000, n_pop=200_000, n_init=1, kmeans_iter=20)
PRESETS = {"original": ORIGINAL, "collapse": COLLAPSE, "tricks": TRICKS, "fang2025": FANG}
PRESET_HELP = {
    "original": "the original framework's comprehensive set: the K, beta, steps and verify sweeps, "
                "fd_ste, manual_ste and rotation at 300 steps, one seed (42)",
    "collapse": "codebook collapse: codes started off the data by each of --shift_values (0 to 8 latent "
                "sd), the encoder fixed, isotropic 8-dimensional latents, K 256, 5 seeds",
    "tricks": "which trick helps, and where: every method from every start at K 16, 64 and 256, with and "
              "without training the encoder, each method at its tuned rates, the matched ablations, "
              "10 seeds (with --quick: the small problem, K 16 and 64, 3 seeds, minutes)",
    "fang2025": "Fang et al. 2025's shifted-Gaussian simulation: their five quantizers at their settings, "
                "mu 0..8, K 16384, 2000 steps, drawn and tabled against their published curves "
                "(fang2025.png, fang2025.md; with --quick: K 1024, mu 0, 4, 8, 200 steps)"}
# What each sweep varies (a fixed value for it contradicts the sweep), and which sweeps use
# each grid flag (values for no sweep run contradict it)
AXES = {"K": ("K",), "beta": ("beta",), "start": ("start",), "shift": ("shift",), "lr": (),
        "tricks": ("start", "K", "train_encoder"), "steps": (), "verify": ()}
VALUES_OF = {"K_values": ("K", "tricks"), "beta_values": ("beta",), "start_values": ("start", "tricks"),
             "shift_values": ("shift",), "lr_values": ("lr",), "steps_max": ("steps",), "steps_every": ("steps",)}
# What --data decides (its sizes) and makes meaningless (the synthetic data's shape): a
# preset's values for them are left out when --data is given
DATA_OWN = (*vq.DATA_SIZES, "lmax", "lmin", "family")
# --quick with a preset: QUICK's problem sizes, and these
SIZES = ("D", "rank", "m", "n_train", "n_eval", "batch", "n_pop", "n_init", "steps")
QUICK_PRESETS = {"tricks": dict(K_values=[16, 64], seeds=3, tune_seeds=1, tune_samples=20_000),
                 "collapse": dict(seeds=2, K=64, n_pop=50_000),
                 "fang2025": dict(shift_values=[0.0, 4.0, 8.0], K=1024, D=8, rank=8, m=8, n_train=20_000,
                                  n_eval=1000, batch=10_000, steps=200, eval_every=20, eval_samples=50_000,
                                  n_pop=50_000, n_init=1)}
# Their quantizers: name -> our method at their settings for K codes. The linear quantizer's
# P and b are shared by the K codes, which step at lrE / K under momentum: lrE = 0.02 K is
# their rate 0.02. The exact-W2 variant of theirs runs beside it (what the approximation
# changes).
FANG_QUANTIZERS = {
    "vanilla": lambda K: ["manual_ste[lrE=1]"],
    "ema": lambda K: ["ema_ste[debias=0, ema_decay=0.9]"],
    "online": lambda K: ["online[lrE=3]"],
    "linear": lambda K: [vq.spec_of("simvq", linear_init=1.0, lrE=0.02 * K)],
    "wasserstein": lambda K: ["wasserstein[alpha=0.1, weight=10, exact=0, lrE=3]",
                              "wasserstein[alpha=0.1, weight=10, exact=1, lrE=3]"]}
FANG_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "fang2025_results.csv")
FANG_STEPS = (100, 500, 1000, 2000)     # the table's steps (those the run reaches)


DEAD_CODES = 1.0         # --ablations: the re-seeding threshold of the "with dead codes" variants


def ablations(methods, settings):
    """The matched ablations of ``methods`` under the settings' recipe: the synchronized
    commitment without the affine map (a = 0) next to STE with alpha + nu and affine's
    weights and optimizer (the same method in the tied model), the affine map without
    sync (nu = 0), and every trained method with dead-code re-seeding switched the other
    way (fd_ste follows manual_ste; FSQ has no codes to re-seed)."""
    cfg = config({**settings, "methods": (), "outdir": None})
    out = []
    if "affine_ste" in methods:
        affine, ste = vq.method_config(cfg, "affine_ste")[1], vq.method_config(cfg, "manual_ste")[1]
        nu = vq.hyperparameters(affine, "affine_ste").nu
        same = {k: getattr(affine, k) for k in ("beta", "optimizer", "weight_decay")
                if getattr(affine, k) != getattr(ste, k)}
        out += ["affine_ste[a=0]", "affine_ste[nu=0]", vq.spec_of("manual_ste", alpha=affine.alpha + nu, **same)]
    dead = 0.0 if cfg.dead_threshold > 0 else DEAD_CODES
    out += [vq.spec_of(m, dead_threshold=dead) for m in methods
            if "[" not in m and not vq.METHODS[m].fit and m not in ("fd_ste", "fsq")]
    return out


def tricks_value(start, K, training):
    return f"{start} K{K} {training}"


def parse_tricks(value):
    """(start, K, training) of a tricks cell's value, e.g. ``"shifted K64 codes"``."""
    start, k, training = value.split()
    return start, int(k[1:]), training


class SweepError(ValueError):
    pass


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------

def t_cdf_two_sided(t, df):
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3-4).

    >>> round(t_cdf_two_sided(2.776445105, 4), 9)
    0.95
    """
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term, total = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return (2 / math.pi) * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(df, level=0.95):
    """Two-sided Student t critical value: P(|T| <= q) = level.

    >>> round(t_quantile(4), 6), round(t_quantile(1), 4), round(t_quantile(30), 6)
    (2.776445, 12.7062, 2.042272)
    """
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < level else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci(values, level=0.95):
    """Mean, sample standard deviation and the t confidence interval of the mean.

    With one value the interval is undefined (NaN).

    >>> m, sd, lo, hi = mean_ci([1, 2, 3, 4, 5])
    >>> m, round(sd, 6), round(lo, 6), round(hi, 6)
    (3.0, 1.581139, 1.036757, 4.963243)
    """
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


# ----------------------------------------------------------------------------
# Work units: one (sweep, cell, seed) each
# ----------------------------------------------------------------------------

_PROBLEM_KEYS = ("D", "rank", "m", "K", "n_train", "n_eval", "seed", "lmax", "lmin",
                 "n_init", "kmeans_iter", "dtype")   # what the data and the start point depend on


def config(settings):
    """A cell's validated :class:`vq.Config`; contradictions between settings are checked
    once per cell in :func:`parse_args`, knowing what the sweep varies."""
    return vq.build_config(settings, dependencies=False)


def _problem_key(cfg):
    return tuple(getattr(cfg, k) for k in _PROBLEM_KEYS)


def cell_settings(settings, sweep, value):
    """The vq_compare settings of one cell: the fixed ones with the swept one set."""
    settings = dict(settings)
    if sweep == "lr":                                       # a scale on both rates
        base = vq.Config()
        settings.update(lrW=value * settings.get("lrW", base.lrW), lrE=value * settings.get("lrE", base.lrE))
    elif sweep == "tricks":
        start, K, training = parse_tricks(value)
        settings.update(start=start, K=K, train_encoder=TRAINING[training])
    elif sweep in GRIDS or sweep == "steps":
        settings[sweep] = value
    return settings


def _task_config(task):
    settings = dict(cell_settings(task["settings"], task["sweep"], task["value"]),
                    seed=task["seed"], outdir=None, quiet=True)
    if task["sweep"] == "steps":
        settings["log_every"] = task["steps_every"]
    return config(settings)


# The methods a fresh interpreter knows (the module's registry, recipe lines in the file
# included): cells of a method registered later in this process (a notebook, a script's
# main block) run here, since a worker could not find it.
SHIPPED = frozenset(vq.METHODS)


def run_tasks(tasks, pool, done):
    """Run ``tasks`` on the processes of ``pool`` and hand each one's result lines to
    ``done(task, lines)`` as soon as it and the tasks before it have finished. The k-means
    restarts of every problem (cells that share data and k-means settings share them) are
    submitted first; each cell follows as soon as its problem's start point is known, so
    the processes never wait for the main one. Returns the number of problems."""
    groups = {}
    for task in tasks:
        groups.setdefault(_problem_key(_task_config(task)), []).append(task)
    starts = []
    for group in groups.values():
        cfg = _task_config(group[0])
        X_train, _, U, *_ = vq.problem_data(cfg)
        starts.append(vq.start_point(cfg, X_train, U, pool))
    cells, runs = [], {}
    here = not all({vq.parse_spec(m)[0] for m in task["settings"]["methods"]} <= SHIPPED for task in tasks)
    for group, finish in zip(groups.values(), starts):
        W0, E0, seconds, reference = finish()
        start = W0, E0, seconds, reference()
        for task in group:             # a cell another sweep already runs (the same settings) runs once
            key = json.dumps(vq._json_ready(dataclasses.asdict(_task_config(task))), sort_keys=True)
            key += task["sweep"] if task["sweep"] in ("steps", "verify") else ""   # their own lines
            if key not in runs:
                runs[key] = (vq._InProcess() if here else pool).submit(run_task, {**task, "start": start})
            cells.append((task, runs[key]))
        while cells and cells[0][1].done():
            done(*_relabelled(*cells.pop(0)))
    for cell in cells:
        done(*_relabelled(*cell))
    return len(groups)


def _relabelled(task, future):
    """The task and the lines of the run of its settings, under its own sweep and value."""
    return task, [{**line, "sweep": task["sweep"], "value": task["value"]} for line in future.result()]


def run_task(task):
    """Run one (sweep, value, seed) and return its result lines (dicts)."""
    problem = vq.make_problem(_task_config(task), task.get("start"))
    sweep, value = task["sweep"], task["value"]
    base = {"sweep": sweep, "value": value, "seed": task["seed"]}
    if sweep == "verify":
        return [{**base, "method": "fd_vs_manual", **verify_trajectories(problem)}]
    out = vq.compare(problem, check=False)                  # the lines carry no gradient check
    b = out["bounds"]
    lines = []
    for name, r in out["results"].items():
        line = {**base, "method": task.get("labels", {}).get(name, name), "status": r["status"],
                **{k: r.get(k) for k in SCORE_KEYS},
                "pca_floor": b["pca_floor"], "shannon_bound": b["shannon_bound"],
                "rank_m_bound": b["rank_m_bound"], "unconstrained_kmeans": b["unconstrained_kmeans"],
                "floor": b["floor"], "floor_name": b["floor_name"]}
        if sweep == "steps" and r.get("logs") and "batch_loss" in r["logs"]:
            # the population error along training (the curves' fixed fresh sample), and
            # PCA + Lloyd's on the same sample: paired; the eval set's with --n_pop 0
            baseline = out["bounds"]["curve_baseline"].get("curve_recon_mse")
            key = "recon_mse" if baseline is None else "curve_recon_mse"
            line["curve"] = [[e["step"], e[key]] for e in r["logs"]["eval"]]
            line["curve_baseline"] = baseline
        if r.get("logs") and r["logs"].get("fresh"):       # --eval_every
            line["fresh"] = [[e[k] for k in FRESH_KEYS] for e in r["logs"]["fresh"]]
        if line["method"] != name:
            line["run_as"] = name                           # the tuned rates it ran with
        lines.append(vq._json_ready(line))
    return lines


FRESH_KEYS = ("step", "quant_error", "codes_used", "perplexity", "w2", "w2_eigh")


def verify_trajectories(problem):
    """fd_ste and manual_ste trained side by side by the one training loop, step by step
    from the same start on the same batches: the gradient error at every step (finite
    differences at the manual run's point) and how far the two runs have drifted apart."""
    c = problem.cfg
    fd, man = vq.Run(problem, "fd_ste"), vq.Run(problem, "manual_ste")
    gW_err, gE_err, W_diff, recon_diff, steps = [], [], [], [], []
    with np.errstate(all="ignore"):
        for t, Xb in vq.batches(problem):
            frozen = man.method.freeze(man.W, man.V, man.params, Xb, man.hp, None)
            hand = man.method.loss_and_grads(man.W, man.V, man.params, Xb, frozen, man.hp)
            here = fd.method.loss_and_grads(man.W, man.V, man.params, Xb, frozen, fd.hp)
            gW_err.append(vq.rel_err(here.gW, hand.gW))
            gE_err.append(vq.rel_err(here.grads["E"], hand.grads["E"]))
            if not (fd.step(t, Xb) and man.step(t, Xb)):
                break
            W_diff.append(float(np.max(np.abs(fd.W - man.W))))
            if t % c.log_every == 0 or t == c.steps:
                a, b = fd.logs["eval"][-1]["recon_mse"], man.logs["eval"][-1]["recon_mse"]
                steps.append(t)
                recon_diff.append(abs(a - b) / b)
    return {"gW_rel_err": gW_err, "gE_rel_err": gE_err, "max_abs_W_diff": W_diff,
            "eval_steps": steps, "recon_rel_diff": recon_diff}


# ----------------------------------------------------------------------------
# Tuning: every method's rates, chosen on held-out data before it is scored
# ----------------------------------------------------------------------------

TUNE_SEED = 100_000        # tuning seeds are seed + TUNE_SEED + i: disjoint from the scoring seeds
RATES = ("lrE", "lrW")
ADAPTIVE_START = 0.01      # the grid's centre for adam and adamw (their steps do not scale with g)
TIE = 1e-4                 # relative: validation errors this close count as equal


def tunable(cfg, spec, knobs=False):
    """The settings a method's run is tuned over: its rates (none for a fitted method;
    fd_ste follows manual_ste's, the same gradients; lrW only when the encoder trains)
    and, with ``knobs``, its hyperparameters that declare the authors' range."""
    name, own = vq.parse_spec(spec)
    if vq.METHODS[name].fit or name == "fd_ste":
        return ()
    rates = RATES if cfg.train_encoder else RATES[:1]
    return rates + tuple(n for n, _, _, *span in vq.METHODS[name].hyperparameters if knobs and span and n not in own)


def grid_centre(cfg, spec):
    """Where a method's grid starts: its configured rates for sgd and momentum (adam and
    adamw: ``ADAPTIVE_START``), its knobs' configured values; and each one's bounds (a
    knob's: the authors' range)."""
    name = vq.parse_spec(spec)[0]
    mcfg = vq.method_config(cfg, spec)[1]
    hp = vq.hyperparameters(mcfg, spec)
    adaptive = mcfg.optimizer in ("adam", "adamw")
    centre = {k: ADAPTIVE_START if adaptive else getattr(mcfg, k) for k in RATES}
    spans = {}
    for n, _, _, *span in vq.METHODS[name].hyperparameters:
        if span:
            centre[n], spans[n] = getattr(hp, n), tuple(span[0])
    return centre, spans


class Tuner:
    """One method (``base``, a spec) in one cell: each rate of ``order`` in turn (lrE,
    then lrW at the chosen lrE) on a factor-2 grid about its centre, ``centre * 2^k``,
    from k = -1, 0, 1, extended on the side of the best until the best lies inside the
    grid (or ``limit`` doublings out: then it is reported at its bound). A point's score
    is the mean validation error over the tuning seeds; a divergence in any seed makes it
    a failure (infinite), and so does the point one doubling below it (where a run
    diverges moves from seed to seed). Points within ``TIE`` of the lowest count as
    equal, the one nearest the centre chosen; a rate whose points all score the same has
    no effect."""

    def __init__(self, base, rates, order, limit, spans=None):
        self.base, self.rates, self.order, self.limit = base, dict(rates), list(order), limit
        self.spans = spans or {}                  # a knob's range: the authors'
        self.log = {n: {"centre": self.rates[n], "scores": {}, "errors": {}, "status": ""} for n in order}

    def allowed(self, name, k):
        lo, hi = self.spans.get(name, (0.0, math.inf))
        return abs(k) <= self.limit and lo * (1 - 1e-9) <= self.rate(name, k) <= hi * (1 + 1e-9)

    def rate(self, name, k):
        return self.log[name]["centre"] * 2.0 ** k

    def spec(self, k=None):
        """The method at the current rates (the one being tuned at doubling ``k``)."""
        rates = dict(self.rates)
        if k is not None:
            rates[self.order[0]] = self.rate(self.order[0], k)
        name, own = vq.parse_spec(self.base)
        return vq.spec_of(name, **{**own, **rates})

    def wanted(self):
        """The doublings of the current setting still to evaluate (empty: tuning done)."""
        while self.order:
            name = self.order[0]
            seen = self.log[name]["scores"]
            start = [k for k in (-1, 0, 1) if self.allowed(name, k)]
            if not seen and start:
                return start
            if not seen:                          # configured outside its range: kept
                best, step, status = 0, 0, "outside its range"
            else:
                # a rate one doubling below a divergence fails too: the edge moves from seed to seed
                score = {k: math.inf if math.isinf(v) or math.isinf(seen.get(k + 1, 0.0)) else v
                         for k, v in seen.items()}
                low = min(score.values())
                if math.isinf(low):               # nothing stable yet: smaller rates
                    best, step, status = min(seen), -1, "diverged everywhere"
                elif all(v == low for v in seen.values()):
                    best, step, status = 0, 0, "no effect"
                else:   # the best: within TIE of the lowest, the nearest to the centre (noise picks no edge)
                    best = min((k for k in score if score[k] <= low + TIE * abs(low)), key=lambda k: (abs(k), k))
                    step = -1 if best == min(seen) else 1 if best == max(seen) else 0
                    status = "inside" if step == 0 else "at its bound"
                if step and self.allowed(name, best + step):
                    return [best + step]
            self.rates[name], self.log[name]["status"] = self.rate(name, best), status
            self.order.pop(0)
            if self.order:                        # the next one, about its configured value
                self.log[self.order[0]]["centre"] = self.rates[self.order[0]]
        return []

    def record(self, k, errors):
        name = self.order[0]
        self.log[name]["errors"][k] = errors
        self.log[name]["scores"][k] = math.inf if any(e is None for e in errors) else float(np.mean(errors))

    def report(self):
        """The chosen rates, and per rate its grid: (rate, mean validation error or None if
        it diverged, the errors per tuning seed) and where the best lies."""
        return {"rates": dict(self.rates),
                "grid": {n: {"status": log["status"],
                             "points": [[self.rate(n, k), log["scores"][k] if math.isfinite(log["scores"][k]) else None,
                                         log["errors"][k]] for k in sorted(log["scores"])]}
                         for n, log in self.log.items()}}


def tune(args, pool, tasks, log=print):
    """Tune every method's rates in every cell of ``tasks`` (see :class:`Tuner`) on
    ``--tune_seeds`` seeds of their own, each point scored on ``--tune_samples`` fresh
    samples of the validation stream. Returns {cell: {spec: report}} (tuning.json)."""
    cells = {}
    for task in tasks:
        if task["sweep"] not in ("verify", "lr"):
            cells.setdefault(cell_label(task), cell_settings(task["settings"], task["sweep"], task["value"]))
    seeds = [args.seed + TUNE_SEED + i for i in range(args.tune_seeds)]
    tuners, configs, keys, starts = {}, {}, {}, {}
    for label, settings in cells.items():
        cfg = config({**settings, "outdir": None})
        tuners[label] = {}
        for spec in settings["methods"]:
            if tunable(cfg, spec):
                centre, spans = grid_centre(cfg, spec)
                tuners[label][spec] = Tuner(spec, centre, tunable(cfg, spec, args.tune_knobs), args.tune_limit, spans)
        configs[label] = {seed: {**settings, "seed": seed, "n_pop": args.tune_samples, "outdir": None, "quiet": True}
                          for seed in seeds}
        for seed, tuning in configs[label].items():   # each problem's start point, once
            cfg = config(tuning)
            keys[label, seed] = _problem_key(cfg)
            if keys[label, seed] not in starts:
                X_train, _, U, *_ = vq.problem_data(cfg)
                starts[keys[label, seed]] = vq.start_point(cfg, X_train, U, pool)
    starts = {key: (lambda W0, E0, sec, ref: (W0, E0, sec, ref()))(*finish()) for key, finish in starts.items()}
    known = {}                                   # validation errors per (cell, spec, seed)
    rounds = 0
    while True:
        todo = {label: sorted({t.spec(k) for t in ts.values() for k in t.wanted()} - set(known.get(label, {})))
                for label, ts in tuners.items()}
        if not any(todo.values()) and not any(t.wanted() for ts in tuners.values() for t in ts.values()):
            break
        futures = {(label, seed): pool.submit(tune_task, {"sweep": "tune", "value": label, "seed": seed,
                                                          "settings": {**settings, "methods": todo[label]},
                                                          "start": starts[keys[label, seed]]})
                   for label in tuners if todo[label] for seed, settings in configs[label].items()}
        for (label, seed), future in futures.items():
            for spec, err in future.result().items():
                known.setdefault(label, {}).setdefault(spec, {})[seed] = err
        for label, ts in tuners.items():
            for t in ts.values():
                for k in t.wanted():
                    if t.spec(k) in known.get(label, {}):
                        t.record(k, [known[label][t.spec(k)][seed] for seed in seeds])
        rounds += 1
        log(f"tuning, round {rounds}: {sum(len(v) for v in todo.values())} settings x {len(seeds)} seeds evaluated; "
            f"{sum(1 for ts in tuners.values() for t in ts.values() if t.wanted())} methods still tuning")
    return {label: {spec: t.report() for spec, t in ts.items()} for label, ts in tuners.items()}


def read_tuning(outdir):
    """Every tuning file in ``outdir`` (tuning.json and the shards'), as one."""
    chosen = {}
    for path in sorted(glob.glob(os.path.join(outdir, "tuning*.json"))):
        with open(path) as fh:
            chosen.update(json.load(fh))
    return chosen


def cell_label(task):
    return f"{task['sweep']}={task['value']}"


def tuned_methods(methods, chosen):
    """The specs a cell scores: each method at its tuned rates (fd_ste at manual_ste's),
    and the map back to the method's own name."""
    out = {}
    for spec in methods:
        source = chosen.get(spec) or (chosen.get("manual_ste") if vq.parse_spec(spec)[0] == "fd_ste" else None)
        name, own = vq.parse_spec(spec)
        out[vq.spec_of(name, **{**own, **source["rates"]}) if source else spec] = spec
    return out


def tune_task(task):
    """The validation errors of the specs of one tuning task (None: diverged or skipped)."""
    problem = vq.make_problem(_task_config(task), task.get("start"))
    out = vq.compare(problem, check=False, stream="validation")
    return {name: (r.get("pop_recon_mse") if r["status"] == "ok" else None) for name, r in out["results"].items()}


# ----------------------------------------------------------------------------
# Planning, resuming, running
# ----------------------------------------------------------------------------

def plan_sweeps(args):
    return [s for s in SWEEPS if s in args.sweep or "all" in args.sweep]


def plan(args):
    """The ordered list of tasks of a sweep."""
    sweeps = plan_sweeps(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    values = {**{name: getattr(args, f"{name}_values") for name in GRIDS},
              "tricks": [tricks_value(s, k, t) for s in args.start_values for k in args.K_values for t in TRAINING],
              "steps": [args.steps_max], "verify": [args.steps]}
    tasks = []
    for sweep in sweeps:
        for value in values[sweep]:
            for seed in seeds:
                tasks.append({"sweep": sweep, "value": value, "seed": seed,
                              "settings": args.settings, "steps_every": args.steps_every})
    return tasks


def _task_key(line):
    return (line["sweep"], json.dumps(line["value"]), line["seed"])


def _value_key(value):
    """Grid values in order: numbers by size, start regimes as vq_compare lists them."""
    if isinstance(value, str) and " K" in value:           # a tricks cell
        start, K, training = parse_tricks(value)
        return (2, vq.START_REGIMES.index(start), K, list(TRAINING).index(training))
    if isinstance(value, str):
        return (1, vq.START_REGIMES.index(value) if value in vq.START_REGIMES else 0, value)
    return (0, float(value), "")


def _order(line, methods):
    return (SWEEPS.index(line["sweep"]), _value_key(line["value"]), line["seed"],
            methods.index(line["method"]) if line["method"] in methods else len(methods))


def _read_lines(path):
    """Complete lines already written (a line cut short by an interruption is dropped)."""
    lines = []
    if os.path.exists(path):
        with open(path) as fh:
            for raw in fh:
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    break
    return lines


def fingerprint(args):
    """Everything that determines the results of a sweep."""
    return {"sweep": args.sweep, "seeds": args.seeds, "seed": args.seed,
            **{f"{name}_values": getattr(args, f"{name}_values") for name in GRIDS},
            "steps_max": args.steps_max, "steps_every": args.steps_every,
            **({"tune": [args.tune_seeds, args.tune_samples, args.tune_limit, args.tune_knobs]} if args.tune else {}),
            "settings": {**effective_defaults(), **args.settings},   # a default given or not: the same
            # --data: the values, not only the path (a file replaced under the same name)
            **({"data_sha256": vq.checksum(vq.open_data(args.settings["data"], check=False))}
               if args.settings.get("data") else {})}


def effective_defaults():
    """vq_compare's defaults of the settings a sweep fixes (outdir, quiet: not results)."""
    return {**{k: v for k, v in dataclasses.asdict(vq.Config()).items() if k not in ("outdir", "quiet", "method_params")},
            **{k: d for k, (d, _) in vq.declared_params().items()}}


def _shard_path(outdir, shard):
    i, n = shard
    return os.path.join(outdir, f"results.shard-{i}-of-{n}.jsonl")


def _all_lines(outdir):
    """The complete lines of ``results.jsonl`` and of every shard's file, each run once."""
    paths = [os.path.join(outdir, RESULTS)] + sorted(glob.glob(os.path.join(outdir, "results.shard-*-of-*.jsonl")))
    seen = {}
    for path in paths:
        for line in _read_lines(path):
            seen.setdefault((*_task_key(line), line["method"]), line)
    return list(seen.values())


def _complete(lines, methods):
    """Task keys all of whose result lines are present."""
    per_task = Counter(_task_key(line) for line in lines)
    return {k for k, v in per_task.items() if v == (1 if k[0] == "verify" else len(methods))}


def shard_of(tasks, shard):
    """The tasks of shard ``(i, n)``: problems (cells sharing data and start point) dealt
    round-robin in plan order, so that no two shards compute the same k-means."""
    keys = list(dict.fromkeys(_problem_key(_task_config(t)) for t in tasks))
    mine = set(keys[shard[0]::shard[1]])
    return [t for t in tasks if _problem_key(_task_config(t)) in mine]


def run_sweep(args, log=print):
    """Run (or resume) a sweep, or with ``args.shard`` one slice of it; returns the
    sorted result lines of the whole sweep found so far. With ``args.tune`` every
    method's rates are tuned first (or read from tuning.json) and each cell scores its
    methods at their tuned rates."""
    res_path = os.path.join(args.outdir, RESULTS) if not args.shard else _shard_path(args.outdir, args.shard)
    methods = args.settings["methods"]
    complete = _complete(_all_lines(args.outdir), methods)
    planned = plan(args)
    if args.shard:
        planned = shard_of(planned, args.shard)
    tasks = [t for t in planned if _task_key(t) not in complete]
    if args.merge and tasks:
        raise SweepError(f"--merge {args.outdir}: {len(tasks)} of {len(planned)} runs missing "
                         "(run the shards that wrote them, or --resume to run them here)")
    os.makedirs(args.outdir, exist_ok=True)
    vq.write_json(os.path.join(args.outdir, CONFIG), fingerprint(args))
    own = [line for line in _read_lines(res_path) if _task_key(line) in complete]
    _write_lines(res_path, sorted(own, key=lambda ln: _order(ln, methods)))   # drop partial tasks
    total_cells = len({_task_key(t)[:2] for t in planned})
    remaining = Counter(_task_key(t)[:2] for t in tasks)  # runs left per cell
    if len(tasks) < len(planned):
        log(f"resuming: {len(planned) - len(tasks)} of {len(planned)} runs already in {args.outdir}")
    t0 = time.perf_counter()
    n_done = 0
    # Every task runs on the pool: its products are small enough for one BLAS thread
    # each, so --jobs processes keep as many cores busy.
    with vq.process_pool(args.jobs) as pool:
        if args.tune:
            chosen = read_tuning(args.outdir)
            # one machine tunes every cell; a shard its share of the cells, into a file of
            # its own, and scores once every cell it scores is tuned (a second pass)
            cells = list(dict.fromkeys(cell_label(t) for t in plan(args) if t["sweep"] not in ("verify", "lr")))
            mine = set(cells[args.shard[0]::args.shard[1]] if args.shard else cells) - set(chosen)
            if mine:
                found = tune(args, pool, [t for t in plan(args) if cell_label(t) in mine], log)
                vq.write_json(os.path.join(args.outdir, TUNING if not args.shard else
                                           "tuning.shard-{}-of-{}.json".format(*args.shard)), found)
                chosen.update(found)
            missing = {cell_label(t) for t in tasks if t["sweep"] not in ("verify", "lr")} - set(chosen)
            if missing:
                log(f"tuned {len(mine)} cells; {len(missing)} cells of this shard wait for the other shards' "
                    "tuning: run this command again once they are done")
                return None
            for task in tasks:
                if cell_label(task) in chosen:
                    task["labels"] = tuned_methods(task["settings"]["methods"], chosen[cell_label(task)])
                    task["settings"] = {**task["settings"], "methods": list(task["labels"])}

        with open(res_path, "a") as fh:
            def done(task, lines):
                nonlocal n_done
                for line in lines:
                    fh.write(json.dumps(line, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                n_done += 1
                cell = _task_key(task)[:2]
                remaining[cell] -= 1
                if remaining[cell] == 0:
                    elapsed = time.perf_counter() - t0
                    finished = total_cells - sum(1 for v in remaining.values() if v > 0)
                    log(f"[{finished}/{total_cells} cells] {task['sweep']}={task['value']} done "
                        f"({args.seeds} seeds): {elapsed:.1f} s elapsed, "
                        f"~{elapsed / n_done * (len(tasks) - n_done):.1f} s left")
            run_tasks(tasks, pool, done)
    lines = sorted(_all_lines(args.outdir), key=lambda ln: _order(ln, methods))
    if args.shard:
        return lines
    _write_lines(os.path.join(args.outdir, RESULTS), lines)
    return lines


def _write_lines(path, lines):
    data = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()
    vq.write_atomic(path, lambda fh: fh.write(data))


# ----------------------------------------------------------------------------
# Aggregation, table, plots
# ----------------------------------------------------------------------------

# Differences are in % of the reference's mean error, in the CSV as on the console and in
# the plots: the paired difference's mean and 95% interval, times 100 / the reference's mean.
CSV_FIELDS = ["sweep", "param", "value", "method", "n_seeds", "metric", "mean", "sd", "ci_lo", "ci_hi",
              "diff_pct", "diff_pct_lo", "diff_pct_hi", "codes_used", "codes_used_ci_lo",
              "codes_used_ci_hi", "eval_recon_mse", "pca_floor", "shannon_bound", "rank_m_bound",
              "unconstrained_kmeans", "diverged", "collapsed", "vs_ste_pct", "vs_ste_pct_lo", "vs_ste_pct_hi"]
PAIRED = {"pca_lloyd": ("diff_pct", "diff_pct_lo", "diff_pct_hi"),
          "manual_ste": ("vs_ste_pct", "vs_ste_pct_lo", "vs_ste_pct_hi")}


def percent_difference(values, refs):
    """Paired differences ``values - refs`` (per seed) as % of the refs' mean: mean and
    95% interval."""
    d, _, lo, hi = mean_ci([v - r for v, r in zip(values, refs)])
    scale = 100 / float(np.mean(refs))
    return d * scale, lo * scale, hi * scale


COLLAPSED = 0.5            # a seed whose model leaves more than this share of its codes unused has collapsed


def aggregate(lines):
    """Rows of summary.csv: one per (sweep, cell, method)."""
    rows = []
    by_cell = {}
    for ln in lines:
        by_cell.setdefault((ln["sweep"], ln["value"]), []).append(ln)
    for (sweep, value), cell in by_cell.items():
        if sweep == "verify":
            rows.append({"sweep": sweep, "param": "steps", "value": value, "method": "fd_vs_manual",
                         "n_seeds": len(cell), "metric": "max gradient rel. error",
                         "mean": max(max(c["gW_rel_err"] + c["gE_rel_err"]) for c in cell),
                         "eval_recon_mse": max(max(c["recon_rel_diff"]) for c in cell)})
            continue
        if sweep == "steps":
            rows.extend(_aggregate_curves(value, cell))
            continue
        methods = list(dict.fromkeys(c["method"] for c in cell))
        for method in methods:
            ok = [c for c in cell if c["method"] == method and c["status"] == "ok"]
            key = "pop_recon_mse" if ok and ok[0].get("pop_recon_mse") is not None else "recon_mse"
            row = {"sweep": sweep, "param": sweep, "value": value, "method": method,
                   "n_seeds": len(ok), "metric": key,
                   "diverged": sum(1 for c in cell if c["method"] == method and c["status"] != "ok")}
            if ok:
                row["mean"], row["sd"], row["ci_lo"], row["ci_hi"] = mean_ci([c[key] for c in ok])
                row["eval_recon_mse"] = float(np.mean([c["recon_mse"] for c in ok]))
                used, _, lo, hi = mean_ci([1 - c["dead_frac"] for c in ok])   # on the eval set
                row["codes_used"], row["codes_used_ci_lo"], row["codes_used_ci_hi"] = used, lo, hi
                for f in ("pca_floor", "shannon_bound", "rank_m_bound", "unconstrained_kmeans", "floor"):
                    vals = [c[f] for c in ok if c.get(f) is not None]
                    row[f] = float(np.mean(vals)) if vals else None
                row["floor_name"] = ok[0].get("floor_name", "rank-m Shannon bound")
                row["collapsed"] = sum(1 for c in ok if c["dead_frac"] > COLLAPSED)
                for ref, cols in PAIRED.items():
                    base = {c["seed"]: c[key] for c in cell if c["method"] == ref and c["status"] == "ok"}
                    pairs = [(c[key], base[c["seed"]]) for c in ok if c["seed"] in base]
                    if method != ref and pairs:
                        row.update(zip(cols, percent_difference(*zip(*pairs))))
            rows.append(row)
    return rows


CURVE_METRIC = "pop_recon_mse (curve sample)"


def _aggregate_curves(value, cell):
    """The steps sweep: each checkpoint's population error, estimated on the training
    curves' fixed fresh sample (vq_compare.N_CURVE samples, the same at every checkpoint
    and for every model: paired, PCA + Lloyd included); the eval-set error only where
    the run had no population (``--n_pop 0``)."""
    rows = []
    for method in dict.fromkeys(c["method"] for c in cell):
        runs = [c for c in cell if c["method"] == method and c.get("curve")]
        if not runs:
            continue
        curves = [dict(map(tuple, c["curve"])) for c in runs]
        metric = CURVE_METRIC if all(c.get("curve_baseline") is not None for c in runs) else "recon_mse (eval)"
        base = ({c["seed"]: c["curve_baseline"] for c in runs} if metric == CURVE_METRIC else
                {c["seed"]: c["recon_mse"] for c in cell if c["method"] == "pca_lloyd"})
        for step in sorted(set.intersection(*[set(c) for c in curves])):
            vals = [c[step] for c in curves]
            row = {"sweep": "steps", "param": "step", "value": step, "method": method,
                   "n_seeds": len(vals), "metric": metric}
            row["mean"], row["sd"], row["ci_lo"], row["ci_hi"] = mean_ci(vals)
            pairs = [(v, base[c["seed"]]) for v, c in zip(vals, runs) if c["seed"] in base]
            if pairs:
                row.update(zip(PAIRED["pca_lloyd"], percent_difference(*zip(*pairs))))
            rows.append(row)
    return rows


def write_csv(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                        else r[k]) for k in CSV_FIELDS})
    data = buf.getvalue().encode()
    vq.write_atomic(path, lambda fh: fh.write(data))


def format_table(rows):
    out = []
    for sweep in SWEEPS:
        rs = [r for r in rows if r["sweep"] == sweep]
        if not rs:
            continue
        if sweep == "steps":                               # the last checkpoint only
            last = max(r["value"] for r in rs)
            rs = [r for r in rs if r["value"] == last]
        ste = any(r.get("vs_ste_pct") is not None for r in rs)
        out.append("")
        if sweep == "verify":
            out.append("verify sweep (fd_ste's gradient against manual_ste's, trained side by side)")
            for r in rs:
                out.append(f"  steps={r['value']}: largest gradient rel. error {r['mean']:.1e}; "
                           f"fd vs manual, eval error: {r['eval_recon_mse']:.1e} apart at most")
            continue
        out += vq._wrap(f"{sweep} sweep ({rs[0]['metric']}; mean [95% CI] over seeds; used: share of codes "
                        "used on the eval set; seeds: scored / diverged / collapsed (more than half the codes "
                        "unused); diff: paired difference to pca_lloyd, % of its error [95% CI]"
                        + ("; vs STE: paired difference to manual_ste, % of its error (under --tune each "
                           "at its own tuned rates)"
                           if ste else "") + ")")
        w, wm = max(6, *(len(str(r["value"])) for r in rs)), max(18, *(len(r["method"]) + 1 for r in rs))

        def pair(r, d, lo, hi):
            if r.get(d) is None:
                return f"{'':>31}"
            return f"{r[d]:+9.3f}% " + (f"[{r[lo]:+.3f}, {r[hi]:+.3f}]" if not math.isnan(r[lo]) else f"{'':>20}")
        out.append(f"  {rs[0]['param']:>{w}} {'method':<{wm}}{'mean':>10}{'95% CI':>20}{'used':>6}{'seeds':>10}"
                   f"{'diff':>10}{'95% CI':>21}" + (f"{'vs STE':>10}{'95% CI':>21}" if ste else ""))
        for r in rs:
            n = f"{r.get('n_seeds', 0)}/{r.get('diverged', 0)}/{r.get('collapsed', 0)}"
            if r.get("mean") is None:
                out.append(f"  {r['value']!s:>{w}} {r['method']:<{wm}}{'diverged':>10}{'':>26}{n:>10}")
                continue
            ci = f"[{r['ci_lo']:.4f}, {r['ci_hi']:.4f}]" if not math.isnan(r.get("ci_lo", math.nan)) else "n/a (1 seed)"
            used = f"{r['codes_used']:.2f}" if r.get("codes_used") is not None else ""
            out.append(f"  {r['value']!s:>{w}} {r['method']:<{wm}}{r['mean']:>10.5f}{ci:>20}{used:>6}{n:>10}"
                       + pair(r, *PAIRED["pca_lloyd"]) + (pair(r, *PAIRED["manual_ste"]) if ste else ""))
    return "\n".join(out)


METRIC_LABELS = {"pop_recon_mse": "population reconstruction error\n(lower is better)",
                 "recon_mse": "eval-set reconstruction error\n(lower is better)",
                 "recon_mse (eval)": "eval-set reconstruction error\n(lower is better)",
                 CURVE_METRIC: "population reconstruction error on the\ncurves' fixed sample (lower is better)"}


def describe(settings, sweep=None):
    """The fixed settings that differ from vq_compare's defaults, in a few words; not
    those the sweep ``sweep`` varies."""
    defaults, varied = effective_defaults(), AXES.get(sweep, ())
    return ", ".join(f"{k}={v}" for k, v in settings.items()
                     if k != "methods" and k not in varied and defaults.get(k) != v) or "vq_compare's defaults"


def title(text, width=150):
    """A figure title wrapped, never cut."""
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def plot_sweep(rows, sweep, note=""):
    """Left: mean over seeds with its 95% interval per method, with the floor (the
    rank-m bound for Gaussian data, see vq_compare.bounds) and
    the k-means reference. Right: the paired difference to pca_lloyd (%), with its 95%
    interval. ``note``: the fixed settings, for the title."""
    rs = [r for r in rows if r["sweep"] == sweep and r.get("mean") is not None]
    fig, axes = vq._figure(12, 4.2, 1, 2)
    ax0, ax1 = axes[0]
    if sweep == "verify":
        ax0.bar([str(r["value"]) for r in rs], [r["mean"] for r in rs])
        ax0.set_title("fd_ste's gradient against manual_ste's, at the manual run's point", fontsize=10)
        ax0.set_ylabel("largest difference / largest entry,\nover every step and seed (log)")
        ax1.bar([str(r["value"]) for r in rs], [max(r["eval_recon_mse"], 1e-17) for r in rs])
        ax1.set_title("the two runs, trained side by side by the one loop", fontsize=10)
        ax1.set_ylabel("largest relative difference of their\neval errors along the runs (log)")
        for ax in (ax0, ax1):
            ax.set_yscale("log")
            ax.set_xlabel("training steps of the run")
        fig.suptitle(title(f"verify sweep, fixed: {note}"), fontsize=9)
        fig.subplots_adjust(left=0.1, right=0.98, wspace=0.35, top=0.8, bottom=0.14)
        return fig
    methods = list(dict.fromkeys(r["method"] for r in rs))
    values = sorted({r["value"] for r in rs}, key=_value_key)
    categorical = any(isinstance(v, str) for v in values)  # start regimes: one place each
    position = {v: (i if categorical else float(v)) for i, v in enumerate(values)}

    seeds = max((r.get("n_seeds") or 0) for r in rs) if rs else 0

    def band(ax, x, y, lo, hi, style):                      # the 95% interval: bars or a band
        if categorical or seeds <= 3:                       # few seeds: wide intervals, bars stay apart
            ax.errorbar(x, y, yerr=np.abs([y - lo, hi - y]) if np.isfinite(lo).any() else None,
                        capsize=3, **{**style, "ls": "none" if categorical else style["ls"]})
            return
        ax.plot(x, y, **style)
        if np.isfinite(lo).any():
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.22, lw=0)
    for method in methods:
        mr = sorted((r for r in rs if r["method"] == method), key=lambda r: _value_key(r["value"]))
        x = np.array([position[r["value"]] for r in mr], dtype=float)
        if categorical:                # side by side within a category, no line across categories
            x += 0.6 * (methods.index(method) / max(len(methods) - 1, 1) - 0.5)
        elif seeds <= 3 and len(x) > 1:    # bars side by side around each value
            step = np.min(np.diff(np.sort(np.unique(x)))) if len(np.unique(x)) > 1 else 1.0
            if sweep in ("K", "lr"):
                x = x * 2 ** (0.15 * (methods.index(method) / max(len(methods) - 1, 1) - 0.5))
            else:
                x = x + 0.15 * step * (methods.index(method) / max(len(methods) - 1, 1) - 0.5)
        y = np.array([r["mean"] for r in mr])
        lo = np.array([r.get("ci_lo", np.nan) for r in mr], dtype=float)
        hi = np.array([r.get("ci_hi", np.nan) for r in mr], dtype=float)
        style = dict(vq.style(method), ms=5)
        band(ax0, x, y, lo, hi, style)
        if method != "pca_lloyd":
            d, dlo, dhi = (np.array([r.get(k, np.nan) for r in mr], dtype=float) for k in PAIRED["pca_lloyd"])
            band(ax1, x, d, dlo, dhi, style)
    floor = next((r["floor_name"] for r in rs if r.get("floor_name")), "rank-m Shannon bound")
    for key, label, ls in (("floor" if any(r.get("floor") is not None for r in rs) else "rank_m_bound",
                            floor if "floor" in floor else f"{floor} (a floor)", "--"),
                           ("unconstrained_kmeans", "unconstrained k-means", "-.")):
        pts = sorted({(position[r["value"]], r[key]) for r in rs if r.get(key) is not None})
        if pts and categorical:
            for xv, yv in pts:
                ax0.hlines(yv, xv - 0.4, xv + 0.4, color="k", ls=ls, lw=1, label=label if xv == pts[0][0] else None)
        elif pts:
            ax0.plot(*zip(*pts), color="k", ls=ls, lw=1, label=label)
    ax1.axhline(0, color="k", lw=0.8)
    xlabel = GRIDS[sweep][2] if sweep in GRIDS else "step"
    for ax in (ax0, ax1):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if categorical:
            ax.set_xticks(range(len(values)), values)
        elif sweep in ("K", "lr"):
            ax.set_xscale("log", base=2)
    metric = rs[0]["metric"] if rs else ""
    ax0.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax1.set_ylabel("% difference to PCA + Lloyd, paired\n(lower is better)")
    if seeds > 1:
        ax0.set_title("mean over seeds, 95% interval", fontsize=10)
        ax1.set_title("paired difference, 95% interval (crossing 0: not separable)", fontsize=10)
    else:
        ax0.set_title("one seed: no interval", fontsize=10)
        ax1.set_title("paired difference, one seed: no interval", fontsize=10)
    ax0.legend(fontsize=8)
    ax1.legend(fontsize=8)
    text = title(f"{sweep} sweep, {seeds} seed{'s' if seeds != 1 else ''} per point; fixed: {note}")
    fig.suptitle(text, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.84 - 0.04 * text.count("\n"), wspace=0.25)
    return fig


def fang_quantizer(spec):
    """Fang et al.'s quantizer that our method ``spec`` stands for, or None."""
    name, own = vq.parse_spec(spec)
    return {"manual_ste": "vanilla", "ema_ste": "ema", "online": "online", "simvq": "linear",
            "wasserstein": "wasserstein"}.get(name)


def read_fang(path=FANG_DATA):
    """Their published per-step values: {(quantizer, mu): {step: (error, share of codes used)}}
    (empty when the file is missing)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as fh:
        for row in csv.DictReader(line for line in fh if not line.startswith("#")):
            out.setdefault((row["quantizer"], float(row["mu"])), {})[int(row["step"])] = (
                float(row["quant_error"]), float(row["codebook_utilization"]))
    return out


def fang_note(settings):
    return (f"ours: K={settings.get('K')}, batch {settings.get('batch')}, {settings.get('steps')} steps, "
            f"metrics on {settings.get('eval_samples')} fresh samples every {settings.get('eval_every')} steps; "
            "theirs: Fang et al. 2025 (arXiv 2506.15078), K=16384, batch 50000, one seed")


def _fresh(lines, method, mu):
    """Our runs of ``method`` at shift ``mu``: {step: [(error, share used) per seed]}."""
    out = {}
    for ln in lines:
        if ln["method"] == method and float(ln["value"]) == mu and ln.get("fresh"):
            for step, err, used, *_ in ln["fresh"]:
                out.setdefault(int(step), []).append((err, used))
    return out


def fang_within(ours, theirs):
    """The issue's test at one step: error within 10% of theirs (or, where our seeds spread
    wider than 10%, theirs inside our seeds' range) and the share of codes used within
    0.02 or 20% of theirs (or inside our range likewise)."""
    errs, used = [o[0] for o in ours], [o[1] for o in ours]
    e, u = float(np.mean(errs)), float(np.mean(used))
    spread = len(errs) > 1 and (max(errs) - min(errs)) > 0.1 * theirs[0]
    ok_e = abs(e - theirs[0]) <= 0.1 * theirs[0] or (spread and min(errs) <= theirs[0] <= max(errs))
    ok_u = (abs(u - theirs[1]) <= max(0.02, 0.2 * theirs[1])
            or (len(used) > 1 and min(used) <= theirs[1] <= max(used)))
    return ok_e, ok_u


def fang_table(lines, theirs):
    """Markdown: per shift and quantizer, our error and share of codes used (mean over
    seeds, and their range) next to theirs at FANG_STEPS and at the last step, and at how
    many of their published steps (every 100) ours pass :func:`fang_within`."""
    rows = ["| mu | quantizer (ours as) | step | error: theirs | ours | ratio | codes used: theirs | ours "
            "| steps within (error, codes) |", "|---|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(ln["method"] for ln in lines if fang_quantizer(ln["method"])))
    for mu in sorted({float(ln["value"]) for ln in lines}):
        for method in methods:
            q = fang_quantizer(method)
            ours, ref = _fresh(lines, method, mu), theirs.get((q, mu), {})
            steps = [s for s in sorted(ours) if s in ref and s % 100 == 0 and s > 0]
            if not steps:
                continue
            checks = [fang_within(ours[s], ref[s]) for s in steps]
            count = f"{sum(c[0] for c in checks)}/{len(steps)}, {sum(c[1] for c in checks)}/{len(steps)}"
            for s in sorted({s for s in FANG_STEPS if s in steps} | {steps[-1]}):   # and the last
                errs, used = [o[0] for o in ours[s]], [o[1] for o in ours[s]]
                rng = f" [{min(errs):.3f}, {max(errs):.3f}]" if len(errs) > 1 else ""
                rows.append(f"| {mu:g} | {q} ({method}) | {s} | {ref[s][0]:.3f} | {np.mean(errs):.3f}{rng} | "
                            f"{np.mean(errs) / ref[s][0]:.3f} | {ref[s][1]:.4f} | {np.mean(used):.4f} | {count} |")
    return "\n".join(rows)


def plot_fang(lines, theirs, note=""):
    """Our curves and theirs: quantization error (log) and share of codes used against
    steps, one column per shift; each of our seeds a solid line (a second variant of the
    same quantizer dashed), theirs dotted with dots, in the quantizer's colour."""
    mus = sorted({float(ln["value"]) for ln in lines if ln.get("fresh")})
    methods = list(dict.fromkeys(ln["method"] for ln in lines if ln.get("fresh") and fang_quantizer(ln["method"])))
    fig, axes = vq._figure(max(3.2 * len(mus) + 1.5, 11), 8, 2, len(mus))
    steps_max = max(s for ln in lines if ln.get("fresh") for s, *_ in ln["fresh"])
    first = {}
    for method in methods:
        first.setdefault(fang_quantizer(method), method)
    for col, mu in enumerate(mus):
        ax_e, ax_u = axes[0][col], axes[1][col]
        for method in methods:
            st = {**vq.style(method), "ls": "-" if first[fang_quantizer(method)] == method else "--"}
            for i, ln in enumerate(ln for ln in lines if ln["method"] == method and float(ln["value"]) == mu
                                   and ln.get("fresh")):
                f = np.array(ln["fresh"], dtype=float)
                for ax, k in ((ax_e, 1), (ax_u, 2)):
                    ax.plot(f[:, 0], f[:, k], color=st["color"], ls=st["ls"], lw=1.2,
                            label=f"ours: {st['label']}" if i == 0 and col == 0 and ax is ax_e else None)
            ref = theirs.get((fang_quantizer(method), mu))
            if ref and first[fang_quantizer(method)] == method:
                pts = sorted((s, *v) for s, v in ref.items() if s <= steps_max)
                s, e, u = map(np.array, zip(*pts))
                ax_e.plot(s, e, color=st["color"], ls=":", marker=".", ms=5, lw=1,
                          label=f"theirs: {fang_quantizer(method)}" if col == 0 else None)
                ax_u.plot(s, u, color=st["color"], ls=":", marker=".", ms=5, lw=1)
        ax_e.set_yscale("log")
        ax_e.set_title(f"mu = {mu:g}", fontsize=10)
        ax_u.set_xlabel("training step")
        for ax in (ax_e, ax_u):
            ax.grid(alpha=0.3)
        plain_log_ticks(ax_e)
    axes[0][0].set_ylabel("quantization error mean ||z - q||^2\n(log, lower is better)")
    axes[1][0].set_ylabel("share of codes used")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", fontsize=8, ncol=3)
    fig.suptitle("Fang et al. 2025's shifted-Gaussian simulation, ours (solid; a second variant dashed) and "
                 "theirs (dotted)\n" + title(note), fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.86, bottom=0.2, wspace=0.3, hspace=0.18)
    return fig


def plain_log_ticks(ax):
    """Tick labels of a log y axis as plain numbers; the minor ticks labelled only when
    the axis spans less than a decade (it may have no major tick then)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi < 10 * lo else NullFormatter())


def plot_tuning(chosen, rate):
    """Validation error against the rate ``rate`` (lrE or lrW) of every tuned method, one
    panel per cell: the grid each method's tuning evaluated, its choice filled, a
    divergence (in any tuning seed) as a cross on the panel's top edge."""
    cells = [c for c, ms in chosen.items() if any(rate in r["grid"] for r in ms.values())]
    ncols = min(4, max(len(cells), 1))
    nrows = max(1, math.ceil(len(cells) / ncols))
    width = 3.6 * ncols + 3.0                               # 2.8 inches for the legend
    fig, axes = vq._figure(width, 2.9 * nrows + 1.0, nrows, ncols)
    for i, ax in enumerate(axes.flat):
        if i >= len(cells):
            ax.set_visible(False)
            continue
        finite = [p[1] for r in chosen[cells[i]].values() for p in r["grid"].get(rate, {}).get("points", [])
                  if p[1] is not None]
        low, top = (min(finite), 1.3 * max(finite)) if finite else (1.0, 2.0)   # crosses on the top edge
        for spec, r in chosen[cells[i]].items():
            pts = r["grid"].get(rate, {}).get("points", [])
            if not pts:
                continue
            st = vq.style(spec)
            x = np.array([p[0] for p in pts])
            y = np.array([np.nan if p[1] is None else min(p[1], top) for p in pts])
            ax.plot(x, y, lw=1.2, ms=4, **{**st, "mfc": "none"})
            ax.plot([r["rates"][rate]], [min(dict((p[0], p[1]) for p in pts).get(r["rates"][rate]) or top, top)],
                    ls="none", marker=st["marker"], color=st["color"], ms=7)
            bad = x[[p[1] is None for p in pts]]
            ax.plot(bad, np.full(bad.size, top), ls="none", marker="x", color=st["color"], ms=7, mew=2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(low / 1.02, top * 1.05)
        plain_log_ticks(ax)
        ax.set_title(cells[i], fontsize=9)
        ax.set_xlabel(f"{rate} (log scale)", fontsize=8)
        ax.set_ylabel("validation error (log)", fontsize=8)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1 - 2.7 / width, 0.5),
               fontsize=7, frameon=False)
    fig.suptitle("\n".join(vq._wrap(f"tuning of {rate}: mean validation error over the tuning seeds at each rate "
                                    "of the grid (filled: chosen; x: diverged in a tuning seed)", int(width * 15), "")),
                 fontsize=9)
    fig.subplots_adjust(left=0.9 / width, right=1 - 2.8 / width, top=1 - 1.0 / (2.9 * nrows + 1.0),
                        bottom=0.6 / (2.9 * nrows + 1.0), hspace=0.55, wspace=0.35)
    return fig


def plot_tricks(lines, note=""):
    """Every seed of every tricks cell as a point: % above the floor (log; the rank-m
    bound for Gaussian data), one panel per K and training; a diverged seed as a cross
    at the top, the mean as a bar.
    Bimodal outcomes (some seeds collapse, some do not) show as two clouds."""
    cell_lines = [ln for ln in lines if ln["sweep"] == "tricks"]
    if not cell_lines:
        return None
    cells = sorted({ln["value"] for ln in cell_lines}, key=_value_key)
    Ks = sorted({parse_tricks(v)[1] for v in cells})
    trainings = [t for t in TRAINING if any(parse_tricks(v)[2] == t for v in cells)]
    starts = [s for s in vq.START_REGIMES if any(parse_tricks(v)[0] == s for v in cells)]
    methods = list(dict.fromkeys(ln["method"] for ln in cell_lines))
    width = 4.6 * len(Ks) + 3.4                             # 2.6 inches for the legend
    fig, axes = vq._figure(width, 3.6 * len(trainings) + 1.0, len(trainings), len(Ks))
    key = "pop_recon_mse" if cell_lines[0].get("pop_recon_mse") is not None else "recon_mse"
    for (ti, training), (ki, K) in itertools.product(enumerate(trainings), enumerate(Ks)):
        ax = axes[ti][ki]
        for si, start in enumerate(starts):
            cell = [ln for ln in cell_lines if ln["value"] == tricks_value(start, K, training)]
            for mi, method in enumerate(methods):
                x = si + 0.8 * (mi / max(len(methods) - 1, 1) - 0.5)
                pts = [ln for ln in cell if ln["method"] == method]
                ok = [100 * (ln[key] / ln.get("floor", ln["rank_m_bound"]) - 1) for ln in pts if ln["status"] == "ok"]
                st = vq.style(method)
                ax.plot(np.full(len(ok), x), ok, ls="none", marker=st["marker"], color=st["color"], ms=3,
                        mfc=st["mfc"], alpha=0.8, label=st["label"][:48] if ti == ki == si == 0 else None)
                if ok:
                    ax.hlines(np.mean(ok), x - 0.02, x + 0.02, color=st["color"], lw=2)
                n_bad = sum(1 for ln in pts if ln["status"] == "diverged")
                if n_bad:
                    ax.annotate(f"x{n_bad}", (x, 1.0), xycoords=("data", "axes fraction"), ha="center",
                                va="top", fontsize=6, color=st["color"])
        ax.set_yscale("log")
        ax.autoscale_view()
        plain_log_ticks(ax)
        ax.set_xticks(range(len(starts)), starts, fontsize=8)
        ax.set_title(f"K={K}, {'encoder and codes' if training == 'full' else 'codes only'} trained", fontsize=9)
        ax.set_ylabel(f"% above the {cell_lines[0].get('floor_name', 'rank-m Shannon bound')}\n({'population' if key == 'pop_recon_mse' else 'eval'} error; log)",
                      fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.legend(loc="center left", bbox_to_anchor=(1 - 2.5 / width, 0.5), fontsize=6, frameon=False)
    fig.suptitle("\n".join(vq._wrap(f"tricks: every seed a point, its mean a bar; xN at the top: N seeds diverged. "
                                    f"{note}", int(width * 14), "")), fontsize=8)
    fig.subplots_adjust(left=1.0 / width, right=1 - 2.6 / width, top=1 - 1.0 / (3.6 * len(trainings) + 1.0),
                        bottom=0.08, hspace=0.45, wspace=0.3)
    return fig


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _grid(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}")
    return parse


def build_parser():
    p = vq._Parser(prog="sweeps.py", description=" ".join(__doc__.split("\n\n")[0].split()),
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                   epilog="Any other flag below --quiet is vq_compare's (see python vq_compare.py --help): it "
                          "fixes that setting for every cell; a fixed value of a swept setting is refused.")
    p.add_argument("--sweep", choices=SWEEPS + ("all",), nargs="+", default=["K", "beta", "steps", "verify"],
                   help="what to sweep, one or more (all: every one): "
                        + "; ".join(f"{k}: {v}" for k, v in SWEEP_HELP.items()))
    p.add_argument("--seeds", type=vq.whole_number, default=5,
                   help="seeds per cell (seed, seed+1, ...); each draws new data, start and batches")
    p.add_argument("--jobs", type=vq.whole_number, default=0,
                   help="processes for the k-means restarts and then the cells (0: one per core); results "
                        "do not depend on it")
    p.add_argument("--outdir", default="sweeps_out",
                   help="output folder: results.jsonl, summary.csv, sweep_*.png (created if needed)")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUTDIR (results.jsonl "
                   "and the shards' files)")
    p.add_argument("--shard", metavar="I/N", help="run only the I-th (0 to N-1) of N disjoint slices of "
                   "the sweep, into OUTDIR/results.shard-I-of-N.jsonl; 'N' alone takes I from "
                   "SLURM_ARRAY_TASK_ID")
    p.add_argument("--merge", action="store_true", help="assemble results.jsonl, summary.csv and the "
                   "plots from the shards' files in OUTDIR (nothing is computed)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds, with " + ", ".join(
                       f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in QUICK.items())
                   + " (with --preset: that preset's design at a smaller size)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="a study's whole design; flags given with it override it: "
                        + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    for name, (kind, grid, label) in GRIDS.items():
        used = " and ".join(f"--sweep {s}" for s in VALUES_OF[f"{name}_values"])
        p.add_argument(f"--{name}_values", type=_grid(kind), nargs="+", default=grid,
                       help=f"{label}: the values of {used}")
    p.add_argument("--steps_max", type=vq.whole_number, default=500, help="steps sweep: training length")
    p.add_argument("--steps_every", type=vq.whole_number, default=25, help="steps sweep: metrics every this many steps")
    p.add_argument("--methods", nargs="+", default=[], metavar="NAME",
                   help="methods (default: every registered one not marked opt-in; pca_lloyd is always run: "
                        "it is the paired reference)")
    p.add_argument("--ablations", action="store_true",
                   help="add the matched ablations: affine_ste without the affine map (a=0) and without sync "
                        "(nu=0), STE with affine's weights and alpha + nu, and every trained method with "
                        f"dead-code re-seeding switched (--dead_threshold {DEAD_CODES:g} or 0)")
    p.add_argument("--tune", action="store_true",
                   help="first tune each method's lrE and lrW (apart) per cell on a factor-2 grid, extended "
                        "until the best is inside it, chosen on the validation error of --tune_seeds seeds "
                        "disjoint from the scored ones (tuning.json, tuning_*.png); then score every method "
                        "at its tuned rates")
    p.add_argument("--tune_seeds", type=vq.whole_number, default=2, help="--tune: seeds per grid point")
    p.add_argument("--tune_knobs", action="store_true",
                   help="--tune: also each method's knobs that declare their authors' range (after the "
                        "rates, factor-2 steps inside that range; see the registry)")
    p.add_argument("--tune_samples", type=vq.whole_number, default=100_000,
                   help="--tune: fresh validation samples per run")
    p.add_argument("--tune_limit", type=vq.whole_number, default=10,
                   help="--tune: doublings from the grid's centre at most")
    p.add_argument("--quiet", action="store_true",
                   help="nothing on the console (no progress lines, no tables); the files are written as usual")
    return vq.add_config_flags(p, skip={"outdir", "methods", "quiet", "workers"}, defaults=False)   # --jobs: the pool


def parse_args(argv=None):
    """Parse and validate; raises SweepError (or vq.ConfigError) for bad input."""
    p = build_parser()
    args = p.parse_args(argv)
    explicit = {a.dest for a in p._actions if any(o in (argv if argv is not None else sys.argv[1:])
                                                    for o in a.option_strings)}
    args.shard = parse_shard(args.shard)
    if args.shard and args.merge:
        raise SweepError("--shard and --merge: the shards run first, then one --merge")
    presets = ([PRESETS[args.preset]] if args.preset else []) + ([QUICK] if args.quick else [])
    if args.quick and args.preset:       # the preset's design on the small problem, in minutes
        presets[1] = {**{k: v for k, v in QUICK.items() if k not in PRESETS[args.preset] or k in SIZES},
                      **QUICK_PRESETS.get(args.preset, {})}
    for preset in presets:
        for k, v in preset.items():
            if k not in explicit and not (getattr(args, "data", None) and k in DATA_OWN):
                setattr(args, k, v)                         # with --data, its own sizes stay
    if args.preset == "fang2025" and "methods" not in explicit:
        args.methods = [s for q in FANG_QUANTIZERS.values() for s in q(args.K)]
    methods = vq.split_methods(args.methods) or list(vq.default_methods())
    for spec in methods:
        if vq.parse_spec(spec)[0] not in vq.METHODS:
            raise SweepError(f"--methods {spec}: unknown method (known: {', '.join(vq.METHODS)})")
    if "pca_lloyd" not in methods:
        methods.insert(0, "pca_lloyd")
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(vq.Config)
                if getattr(args, f.name, None) is not None and f.name not in ("outdir", "quiet", "methods")}
    settings = {k: v for k, v in settings.items() if v is not False}
    settings.update({k: getattr(args, k) for k in vq.declared_params() if hasattr(args, k)})
    if args.ablations:
        methods += ablations(methods, settings)
    order = list(vq.METHODS)             # the registry's order; a variant after its method
    settings["methods"] = sorted(dict.fromkeys(methods), key=lambda m: order.index(vq.parse_spec(m)[0]))
    args.settings = settings
    if args.seeds < 1:
        raise SweepError(f"--seeds {args.seeds}: must be >= 1")
    if args.seeds > TUNE_SEED:
        raise SweepError(f"--seeds {args.seeds}: must be <= {TUNE_SEED} (the tuning seeds follow)")
    for flag in ("tune_seeds", "tune_samples", "tune_limit"):
        if getattr(args, flag) < 1:
            raise SweepError(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.jobs < 0:
        raise SweepError(f"--jobs {args.jobs}: must be >= 0 (0: one per core)")
    args.jobs = args.jobs or os.cpu_count() or 1
    if args.steps_max < 1 or args.steps_every < 1:
        raise SweepError(f"--steps_max {args.steps_max} --steps_every {args.steps_every}: must be >= 1")
    base = vq.Config()
    args.seed = settings.get("seed", base.seed)
    args.steps = settings.get("steps", base.steps)
    swept = plan_sweeps(args)
    for field in {f for sweep in swept for f in AXES[sweep]}:   # a fixed value that no cell uses
        if field in explicit and all(field in AXES[sweep] for sweep in swept):
            raise SweepError(f"--{field} {getattr(args, field)}: fixed, but --sweep {' '.join(swept)} "
                             f"varies it in every cell (set its values instead)")
    for flag, users in VALUES_OF.items():                   # values for an axis not swept
        if flag in explicit and not set(users) & set(swept):
            raise SweepError(f"--{flag}: only used by --sweep {' or '.join(users)}, which --sweep "
                             f"{' '.join(args.sweep)} does not run")
    for sweep in swept:                                     # every cell's settings, checked up front
        cells = plan(args) if sweep == "tricks" else []
        for value in getattr(args, f"{sweep}_values", []) or [t["value"] for t in cells if t["sweep"] == sweep]:
            try:
                vq.contradiction(config({**cell_settings(settings, sweep, value), "outdir": None}),
                                 varying=("start",) if sweep in ("start", "tricks") else ())
            except vq.ConfigError as e:
                raise SweepError(f"--{sweep}_values {value}: {e}")
    config({**settings, "seed": args.seed + args.seeds - 1, "outdir": None})
    if args.merge and not os.path.exists(os.path.join(args.outdir, CONFIG)):
        raise SweepError(f"--merge {args.outdir}: no sweep there ({CONFIG} missing)")
    args.created_outdir = not os.path.exists(args.outdir)
    vq.check_outdir(args.outdir)                            # created and probed: the last check
    #                                                         before results exist there
    res_path = os.path.join(args.outdir, RESULTS)
    if args.resume or args.merge or args.shard:
        cfg_path = os.path.join(args.outdir, CONFIG)
        if os.path.exists(cfg_path):
            with open(cfg_path) as fh:
                old = json.load(fh)
            new = json.loads(json.dumps(vq._json_ready(fingerprint(args))))
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                if "settings" in diff:
                    so, sn = old.get("settings", {}), new["settings"]
                    diff = [f"{k}: {so.get(k)!r} -> {sn.get(k)!r}" for k in sorted(set(so) | set(sn))
                            if so.get(k) != sn.get(k)] + [d for d in diff if d != "settings"]
                raise SweepError(f"--resume {args.outdir}: written with other settings ({'; '.join(map(str, diff))})")
    if args.shard and not args.resume and os.path.exists(_shard_path(args.outdir, args.shard)) \
            and os.path.getsize(_shard_path(args.outdir, args.shard)) > 0:
        raise SweepError(f"--shard {args.shard[0]}/{args.shard[1]}: its file in {args.outdir} holds "
                         "results already; pass --resume")
    elif not (args.resume or args.merge or args.shard) and os.path.exists(res_path) and os.path.getsize(res_path) > 0:
        raise SweepError(f"--outdir {args.outdir}: holds a sweep already; pass --resume or choose another folder")
    return args


def parse_shard(text):
    """``"I/N"`` -> (I, N); ``"N"`` -> (SLURM_ARRAY_TASK_ID, N); None -> None."""
    if text is None:
        return None
    i_text, _, n_text = text.rpartition("/")
    if not i_text and "/" not in text:
        i_text = os.environ.get("SLURM_ARRAY_TASK_ID")
        if i_text is None:
            raise SweepError(f"--shard {text}: give I/N, or run inside a job array (SLURM_ARRAY_TASK_ID)")
    try:
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise SweepError(f"--shard {text}: must be I/N with whole numbers, 0 <= I < N") from None
    if not 0 <= i < n:
        raise SweepError(f"--shard {text}: must be I/N with 0 <= I < N (I={i}, N={n})")
    return i, n


def main(argv=None):
    """``python sweeps.py [--flag value ...]``; returns the exit status (2 for bad input,
    one line on stderr, before any work)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:                                 # --help, or a flag argparse refused
        return e.code
    except (SweepError, vq.ConfigError) as e:
        sys.stderr.write(f"sweeps.py: error: {e}\n")
        return 2
    try:
        return _run(args)
    except SweepError as e:                                 # --merge with runs missing
        sys.stderr.write(f"sweeps.py: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"sweeps.py: interrupted: {interrupted(args, argv)}\n")
        return 130


def interrupted(args, argv):
    """What an interrupted sweep leaves, in words, and how to finish it; a folder this
    command created that holds no finished run is removed."""
    path = os.path.join(args.outdir, RESULTS) if not args.shard else _shard_path(args.outdir, args.shard)
    lines = len(_read_lines(path)) if os.path.exists(path) else 0
    if lines == 0 and args.created_outdir:
        shutil.rmtree(args.outdir, ignore_errors=True)
        return "no run had finished: nothing saved"
    words = [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = " ".join(["python", "sweeps.py", *words, *([] if "--resume" in words else ["--resume"])])
    return f"{lines} result lines saved in {path}; finish with: {command}"


def _run(args):
    t0 = time.perf_counter()
    lines = run_sweep(args, log=(lambda *a: None) if args.quiet else
                      (lambda text: print(text, file=sys.stderr, flush=True)))   # progress: stderr
    if lines is None:                                       # a shard's tuning pass
        return 0
    if args.shard:
        if not args.quiet:
            print(f"shard {args.shard[0]}/{args.shard[1]} done: {_shard_path(args.outdir, args.shard)}; "
                  f"{time.perf_counter() - t0:.1f} s; when every shard is done: the same command "
                  "with --merge instead of --shard")
        return 0
    rows = aggregate(lines)
    write_csv(os.path.join(args.outdir, SUMMARY), rows)
    for sweep in dict.fromkeys(r["sweep"] for r in rows if r["sweep"] != "tricks"):
        note = describe(args.settings, sweep) + ("; every method at its tuned rates" if args.tune else "")
        vq.save_figure(plot_sweep(rows, sweep, note),
                       os.path.join(args.outdir, f"sweep_{sweep}.png"))
    if any(ln.get("fresh") for ln in lines) and any(fang_quantizer(ln["method"]) for ln in lines):
        theirs = read_fang()
        table = fang_table(lines, theirs)
        data = (fang_note(args.settings) + "\n\n" + table + "\n").encode()
        vq.write_atomic(os.path.join(args.outdir, "fang2025.md"), lambda fh: fh.write(data))
        vq.save_figure(plot_fang(lines, theirs, fang_note(args.settings)), os.path.join(args.outdir, "fang2025.png"))
        if not args.quiet:
            print(table + "\n")
    if any(r["sweep"] == "tricks" for r in rows):             # every seed a point
        vq.save_figure(plot_tricks(lines, describe(args.settings, "tricks")),
                       os.path.join(args.outdir, "sweep_tricks.png"))
    chosen = read_tuning(args.outdir) if args.tune else {}
    if chosen:
        if not os.path.exists(os.path.join(args.outdir, TUNING)):   # the shards' files, merged
            vq.write_json(os.path.join(args.outdir, TUNING), chosen)
        for rate in RATES:
            if any(rate in r["grid"] for ms in chosen.values() for r in ms.values()):
                vq.save_figure(plot_tuning(chosen, rate), os.path.join(args.outdir, f"tuning_{rate}.png"))
    if not args.quiet:
        print(format_table(rows))
        print(f"\n{len(lines)} result lines in {args.outdir}/{RESULTS}; table in {SUMMARY}; "
              f"plots sweep_*.png; {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
