"""The tables of docs/findings.md from a tricks sweep's folder (results.jsonl, tuning.json).

    python docs/tables.py DIR > tables.md

Every number is recomputed from the result lines: the population error as % above the
rank-m Shannon bound per seed, its mean and 95% t-interval over the seeds, paired
differences to STE at its own tuned rates (same seeds, same data), the seeds that
diverged or collapsed, and from the tuning's grids where each rate landed and how wide
the range of good rates is.
"""
import itertools
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sweeps  # noqa: E402
import vq_compare as vq  # noqa: E402

GOOD = 0.05    # a rate is "good" when its validation error is within 5% of the best rate's


def percent(line):
    return 100 * (line["pop_recon_mse"] / line["rank_m_bound"] - 1)


def cell_of(lines, value):
    out = {}
    for ln in lines:
        if ln["value"] == value:
            out.setdefault(ln["method"], {})[ln["seed"]] = ln
    return out


def fmt_ci(values, digits=None):
    m, _, lo, hi = sweeps.mean_ci(values)
    digits = digits if digits is not None else 1 if abs(m) >= 1 else 2
    if math.isnan(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def verdict(values):
    m, _, lo, hi = sweeps.mean_ci(values)
    if math.isnan(lo) or lo <= 0 <= hi:
        return "not separable"
    return "lower" if hi < 0 else "higher"


def main(folder):
    lines = [json.loads(x) for x in open(os.path.join(folder, "results.jsonl"))]
    lines = [ln for ln in lines if ln["sweep"] == "tricks"]
    tuning = json.load(open(os.path.join(folder, "tuning.json"))) if os.path.exists(
        os.path.join(folder, "tuning.json")) else {}
    values = sorted({ln["value"] for ln in lines}, key=sweeps._value_key)
    methods = list(dict.fromkeys(ln["method"] for ln in lines))
    starts = [s for s in vq.START_REGIMES if any(v.startswith(s + " ") for v in values)]
    Ks = sorted({sweeps.parse_tricks(v)[1] for v in values})
    seeds = sorted({ln["seed"] for ln in lines})
    print(f"Seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}); % above the rank-m Shannon bound, population error, "
          "mean [95% interval]; used: share of codes used (eval set); d/c: seeds diverged / collapsed "
          f"(more than {sweeps.COLLAPSED:.0%} of the codes unused).\n")
    def tables(title, methods, entry):
        """One table per K and training: a row per method, a column per start."""
        for K, training in itertools.product(Ks, sweeps.TRAINING):
            cells = [sweeps.tricks_value(s, K, training) for s in starts]
            if not all(c in values for c in cells):
                continue
            print(title(K, training) + "\n")
            print("| method | " + " | ".join(starts) + " |")
            print("|---|" + "---|" * len(starts))
            for method in methods:
                print(f"| {vq.method_label(method)} | " + " | ".join(entry(cell_of(lines, c), method) for c in cells)
                      + " |")
            print()

    def error(cell, method):
        runs = cell.get(method, {})
        ok = [r for r in runs.values() if r["status"] == "ok"]
        div, col = len(runs) - len(ok), sum(1 for r in ok if r["dead_frac"] > sweeps.COLLAPSED)
        if not ok:
            return "diverged"
        return (f"{fmt_ci([percent(r) for r in ok])}; {np.mean([1 - r['dead_frac'] for r in ok]):.2f}"
                + (f"; {div}/{col}" if div or col else ""))

    def to_ste(cell, method):
        ste, me = cell.get("manual_ste", {}), cell.get(method, {})
        d = [percent(me[s]) - percent(ste[s]) for s in me if s in ste and me[s]["status"] == ste[s]["status"] == "ok"]
        return f"{fmt_ci(d)} {verdict(d)}" if len(d) > 1 else "-"

    tables(lambda K, t: f"#### K={K}, {'encoder and codes trained' if t == 'full' else 'codes only'}", methods, error)
    print("#### Paired difference to STE at its own tuned rates (points of the rank-m bound, mean [95% interval])\n")
    tables(lambda K, t: f"K={K}, {t}:", [m for m in methods if m not in ("manual_ste", "fd_ste")], to_ste)
    if tuning:
        status, bound, widths = {}, [], {}
        for cell, ms in tuning.items():
            for spec, rep in ms.items():
                for rate, g in rep["grid"].items():
                    status[g["status"]] = status.get(g["status"], 0) + 1
                    if g["status"] not in ("inside", "no effect"):
                        bound.append(f"{cell} {spec} {rate}: {g['status']}")
                    pts = [p for p in g["points"] if p[1] is not None]
                    if pts and g["status"] == "inside":
                        best = min(p[1] for p in pts)
                        good = [p[0] for p in pts if p[1] <= (1 + GOOD) * best]
                        widths.setdefault((spec, rate), []).append(math.log2(max(good) / min(good)))
        print("#### Tuning\n")
        print("Where each tuned rate landed (cells x methods x rates): " +
              ", ".join(f"{k} {v}" for k, v in sorted(status.items())) + ".\n")
        for b in bound:
            print(f"- {b}")
        print("\nRobustness to the rate: doublings spanned by the rates within "
              f"{GOOD:.0%} of the best validation error (median over cells; 0: one rate only)\n")
        print("| method | lrE | lrW |\n|---|---|---|")
        for spec in dict.fromkeys(s for s, _ in widths):
            w = [widths.get((spec, r)) for r in ("lrE", "lrW")]
            print(f"| {vq.method_label(spec)} | " + " | ".join(f"{np.median(x):.0f}" if x else "-" for x in w) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
