"""Benchmarks of vq_compare: prints figures, asserts nothing (these machines are shared).

    python benchmarks/bench.py            # everything (a few minutes)
    python benchmarks/bench.py --only kmeans nearest step scaling memory data default busy sweeps realistic

Each timing is min / median / max over repeats measured in this one run, so ratios
between rows compare like with like. scikit-learn and PyTorch are compared against only
when installed; otherwise that row says it was skipped.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import vq_compare as vq  # noqa: E402

ROOT = os.path.dirname(HERE)


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return np.array(times), out


def fmt(times, unit=1.0, suffix="s"):
    return (f"min {times.min() * unit:8.3f} {suffix}  median {np.median(times) * unit:8.3f} {suffix}"
            f"  max {times.max() * unit:8.3f} {suffix}")


def bench_kmeans(repeats):
    print("\n## lloyd vs scikit-learn: 200,000 x 8 float64 points, K=256, 20 iterations, same centres")
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(200_000, 8))
    E0 = Z[rng.choice(len(Z), 256, replace=False)]
    t_ours, r = timed(lambda: vq.lloyd(Z, E0, max_iter=20), repeats)
    print(f"vq_compare.lloyd   {fmt(t_ours)}  inertia {r.inertia:.10e}")
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("scikit-learn       skipped: not installed")
        return
    t_sk, km = timed(lambda: KMeans(256, init=E0, n_init=1, max_iter=20, tol=0,
                                    algorithm="lloyd").fit(Z), repeats)
    print(f"sklearn KMeans     {fmt(t_sk)}  inertia {km.inertia_:.10e}")
    print(f"ratio ours / sklearn (medians) {np.median(t_ours) / np.median(t_sk):.2f}; "
          f"inertia relative difference {abs(r.inertia - km.inertia_) / km.inertia_:.1e}")


def _search_before(Z, E):
    """The nearest-code search as it was before the large-K work (blocks of 2^18
    multiply-adds, ``||e||^2`` added in a pass of its own): the reference of the speed-up."""
    minus_2Et, e_sq = -2.0 * E.T, np.einsum("km,km->k", E, E)
    labels = np.empty(len(Z), dtype=np.intp)
    rows = max(1, (1 << 18) // (E.shape[0] * Z.shape[1]))
    for s in range(0, len(Z), rows):
        d = Z[s:s + rows] @ minus_2Et
        d += e_sq
        labels[s:s + rows] = d.argmin(axis=1)
    return labels


def _bare_product(Z, E):
    """The product alone, in the blocks of our full search: the floor of any full search."""
    A = vq._augmented(E, Z.dtype)
    rows = max(1, min(len(Z), max(vq._SEARCH_ROWS, vq._PRODUCT // (A.shape[0] * E.shape[0]))))
    Za = np.ones((rows, Z.shape[1] + 1), Z.dtype)
    out = np.empty((rows, E.shape[0]), Z.dtype)
    for s in range(0, len(Z), rows):
        c = min(rows, len(Z) - s)
        Za[:c, :-1] = Z[s:s + c]
        vq._products(Za[:c], A, out[:c])


def bench_nearest(repeats):
    print("\n## nearest code: B = 50,000 latents, K = 16,384 codes, m = 8 (Fang et al.'s study)")
    rng = np.random.default_rng(0)
    Z, E = rng.normal(size=(50_000, 8)), rng.normal(size=(16_384, 8))
    Z32, E32 = Z.astype(np.float32), E.astype(np.float32)
    for title, Zc in (("codes drawn like the data", Z), ("codes 4 sd off the data (mu = 4, the study's start)", Z + 4)):
        rows = {"bare blocked float64 product": lambda: _bare_product(Zc, E),
                "search before this work": lambda: _search_before(Zc, E),
                "ours, float64 throughout": lambda: vq._nearest_full(Zc, E, screen=False),
                "ours, nearest() (float64 in)": lambda: vq.nearest(Zc, E),
                "ours, nearest() (float32 in)": lambda: vq.nearest(Zc.astype(np.float32), E32)}
        times = {k: [] for k in rows}
        for _ in range(repeats):                            # interleaved: A B C A B C ...
            for k, fn in rows.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        ref = vq._nearest_full(Zc, E, screen=False)[0]
        same = (np.array_equal(vq.nearest(Zc, E)[0], ref) and np.array_equal(_search_before(Zc, E), ref)
                and np.array_equal(vq.nearest(Zc.astype(np.float32), E32)[0],
                                   vq._nearest_full(Zc.astype(np.float32).astype(float), E32.astype(float),
                                                    screen=False)[0]))
        print(f"### {title}: labels equal to the float64 search: {same}")
        base = np.median(times["bare blocked float64 product"])
        for k, t in times.items():
            t = np.array(t)
            print(f"{k:32s} {fmt(t)}  / product {np.median(t) / base:5.2f}")
        print(f"speed-up of nearest() over the search before: "
              f"{np.median(times['search before this work']) / np.median(times['ours, nearest() (float64 in)']):.1f}x")
    del Z32


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS"))


def _tree_rss_kib(root):
    """Resident memory (KiB) of process ``root`` plus all its descendants, now. A child
    still between fork and exec shares its parent's memory: it is not counted."""
    with open(f"/proc/{root}/cmdline", "rb") as fh:
        root_cmd = fh.read()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
            if pid != root:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if fh.read() == root_cmd:              # not yet exec'd
                        continue
            total += _rss_kib(pid)
        except (OSError, ValueError, StopIteration):
            continue                                       # gone meanwhile
    return total


def _status_kib(pid, key):
    with open(f"/proc/{pid}/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(key + ":"))


def _peak_rss_mib(code, anon=None):
    """Peak resident memory (MiB) of a fresh Python process running ``code``, as that
    process reports it itself (VmHWM); the peak of its resident memory plus its worker
    processes', sampled every 20 ms; and what else it printed."""
    # VmHWM belongs to the process's own address space (ru_maxrss can carry the parent's
    # high-water mark across fork + exec)
    wrapped = ("try:\n" + "".join(f"    {ln}\n" for ln in code.splitlines())
               + "finally:\n    print('PEAK', [l.split()[1] for l in open('/proc/self/status')"
               " if l.startswith('VmHWM')][0])\n")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-c", wrapped], cwd=ROOT, stdout=out, stderr=err, text=True)
        tree = 0
        while p.poll() is None:
            try:
                tree = max(tree, _tree_rss_kib(p.pid))
                if anon is not None:                       # memory of its own, not pages of a file
                    anon[0] = max(anon[0], _status_kib(p.pid, "RssAnon") / 1024)
            except (OSError, StopIteration):
                pass                                       # finished meanwhile
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(stderr)
    lines = stdout.strip().splitlines()
    peak = int(lines[-1].split()[1]) / 1024                # VmHWM is in KiB
    return peak, max(peak, tree / 1024), "\n".join(lines[:-1])


def bench_memory(repeats):
    print("\n## memory: lloyd on 1,000,000 x 8 points, K=1024 (whole process, peak RSS)")
    code = ("import time, numpy as np, vq_compare as vq\n"
            "rng = np.random.default_rng(0)\n"
            "Z = rng.normal(size=(1_000_000, 8))\n"
            "E0 = Z[rng.choice(len(Z), 1024, replace=False)]\n"
            "t = time.perf_counter(); r = vq.lloyd(Z, E0, max_iter=10)\n"
            "print(f'{time.perf_counter() - t:.2f} s, {r.n_iter} iterations')\n")
    peak, _, out = _peak_rss_mib(code)
    print(f"peak RSS {peak:.0f} MiB ({out}); the data alone are {1_000_000 * 8 * 8 / 2**20:.0f} MiB")


def bench_data(repeats, n=1_000_000, D=64):
    print(f"\n## --data: a {n:,} x {D} float32 .npy file (the default methods), mapped, against the same "
          "array loaded into memory (whole process and its workers, peak RSS)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        rng = np.random.default_rng(0)                      # written in blocks: this process stays small
        X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
        scale = np.linspace(2.0, 0.2, D).astype(np.float32)
        for a in range(0, n, 1 << 16):
            X[a:a + (1 << 16)] = rng.standard_normal((min(1 << 16, n - a), D), dtype=np.float32) * scale
        X.flush()
        del X
        size = os.path.getsize(path) / 2**20
        run = ("import json, time, numpy as np, vq_compare as vq\n"
               "t = time.perf_counter()\n"
               "s = vq.run_comparison(data={data}, quiet=True)\n"
               "print(time.perf_counter() - t)\n"
               "print(json.dumps({{k: r.get('pop_recon_mse') for k, r in s['results'].items()}}))\n")
        anon_m, anon_l = [0.0], [0.0]
        mapped, mapped_tree, out_m = _peak_rss_mib(run.format(data=repr(path)), anon_m)
        loaded, loaded_tree, out_l = _peak_rss_mib(run.format(data=f"np.load({path!r})"), anon_l)
    t_m, res_m = out_m.splitlines()
    t_l, res_l = out_l.splitlines()
    print(f"file {size:.0f} MiB; mapped: {float(t_m):.1f} s, peak RSS {mapped:.0f} MiB ({mapped_tree:.0f} MiB "
          f"with workers), of which its own memory (RssAnon, sampled) {anon_m[0]:.0f} MiB, the rest pages of "
          f"the file, which the kernel may drop; loaded: {float(t_l):.1f} s, peak RSS {loaded:.0f} MiB "
          f"({loaded_tree:.0f} MiB with workers), its own memory {anon_l[0]:.0f} MiB")
    same = json.loads(res_m) == json.loads(res_l)
    print(f"population errors of the mapped run {'equal' if same else 'DIFFER FROM'} the in-memory run's: {res_m}")


def _torch_step(D, m, K, B, steps):
    import torch
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100_000 if D <= 512 else 20_000, D, generator=g)
    W = torch.linalg.qr(torch.randn(D, m, generator=g))[0].T.contiguous().requires_grad_(True)
    E = torch.randn(K, m, generator=g).requires_grad_(True)
    alpha, beta, lrW, lrE = 1.0, 0.25, 0.08, 0.2

    def step():
        idx = torch.randint(0, X.shape[0], (B,), generator=g)
        Xb = X[idx]
        Z = Xb @ W.T
        d = (Z.detach() ** 2).sum(1, keepdim=True) - 2 * Z.detach() @ E.detach().T + (E.detach() ** 2).sum(1)
        Q = E[d.argmin(1)]
        Qt = Z + (Q - Z).detach()                          # straight through
        loss = ((Xb - Qt @ W) ** 2).sum(1).mean() + alpha * ((Z.detach() - Q) ** 2).sum(1).mean() \
            + beta * ((Z - Q.detach()) ** 2).sum(1).mean()
        gW, gE = torch.autograd.grad(loss, (W, E))
        with torch.no_grad():
            sym = gW @ W.T
            G_R = gW - 0.5 * (sym + sym.T) @ W
            U, _, Vt = torch.linalg.svd(W - lrW * G_R, full_matrices=False)
            W.copy_(U @ Vt)
            E.sub_(lrE * gE)
    for _ in range(5):
        step()
    return timed(step, steps)[0]


def _our_step(D, m, K, B, steps, dtype):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100_000 if D <= 512 else 20_000, D)).astype(dtype)
    W = vq.stiefel_project(rng.normal(size=(m, D))).astype(dtype)
    E = rng.normal(size=(K, m)).astype(dtype)
    state = [W, E]

    def step():
        Xb = X[rng.integers(0, X.shape[0], size=B)]
        loss, gW, gE, _ = vq.manual_grads(state[0], state[1], Xb, 1.0, 0.25)
        state[0] = vq.riemannian_step(state[0], gW, 0.08)
        state[1] = state[1] - 0.2 * gE
    for _ in range(5):
        step()
    return timed(step, steps)[0]


def bench_step(repeats):
    print("\n## one STE gradient step (batch gather, gradients, Riemannian update), D=512 m=16 K=512 B=1024")
    t32 = _our_step(512, 16, 512, 1024, 30 * repeats, np.float32)
    t64 = _our_step(512, 16, 512, 1024, 30 * repeats, np.float64)
    print(f"vq_compare float32  {fmt(t32, 1e3, 'ms')}")
    print(f"vq_compare float64  {fmt(t64, 1e3, 'ms')}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch autograd    skipped: not installed")
        return
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    tt = _torch_step(512, 16, 512, 1024, 30 * repeats)
    print(f"PyTorch autograd float32 ({torch.__version__}, {torch.get_num_threads()} threads) {fmt(tt, 1e3, 'ms')}")
    print(f"ratio vq_compare float32 / PyTorch (medians) {np.median(t32) / np.median(tt):.2f}")


def bench_scaling(repeats):
    print("\n## time per gradient step as D, K and B grow (m=16 unless D is small), median ms")
    print(f"{'D':>6}{'m':>4}{'K':>6}{'B':>6}{'float64':>10}{'float32':>10}")
    for D, m, K, B in [(64, 4, 32, 1024), (256, 16, 128, 1024), (512, 16, 512, 1024),
                       (512, 16, 512, 4096), (1024, 16, 1024, 1024), (1024, 32, 2048, 4096)]:
        t64 = _our_step(D, m, K, B, 10 * repeats, np.float64)
        t32 = _our_step(D, m, K, B, 10 * repeats, np.float32)
        print(f"{D:>6}{m:>4}{K:>6}{B:>6}{np.median(t64) * 1e3:>10.2f}{np.median(t32) * 1e3:>10.2f}")


def _run_cli(args):
    with tempfile.TemporaryDirectory() as out:
        code = ("import vq_compare as vq\n"
                f"assert vq.main({args + ['--outdir', out, '--quiet']!r}) == 0")
        t0 = time.perf_counter()
        peak, tree, _ = _peak_rss_mib(code)
        wall = time.perf_counter() - t0
        with open(os.path.join(out, "summary.json")) as fh:
            summary = json.load(fh)
        return wall, peak, tree, summary


def _parts_line(summary):
    """The seconds summary.json gives the parts of the work (summed over the processes
    or threads that ran them)."""
    res, b = summary["results"], summary["bounds"]
    methods = sum(r["seconds"] for n, r in res.items() if n != "pca_lloyd")
    return (f"parts (summary.json, one run): start point {res['pca_lloyd']['seconds']:.2f} s, "
            f"unconstrained reference {b['unconstrained_kmeans_seconds']:.2f} s, other methods "
            f"{methods:.2f} s, floors and population {b['seconds']:.2f} s; the run {summary['total_seconds']:.2f} s "
            "inside the interpreter")


def _children_cpu():
    """CPU seconds (user + system) of the finished child processes and their children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_line(cpus, times):
    cores = os.cpu_count() or 1
    return (f"compute {np.median(cpus):.2f} CPU-s (median, every process of the run): on {cores} "
            f"cores no schedule finishes under {np.median(cpus) / cores:.2f} s; "
            f"cores busy {np.median(cpus) / np.median(times):.2f} of {cores}")


def bench_end_to_end(name, args, repeats):
    print(f"\n## end to end, {name}: python vq_compare.py {' '.join(args)}")
    times, peaks, trees, cpus = [], [], [], []
    for _ in range(repeats):
        c0 = _children_cpu()
        t, peak, tree, summary = _run_cli(args)
        cpus.append(_children_cpu() - c0)
        times.append(t)
        peaks.append(peak)
        trees.append(tree)
    print(f"wall {fmt(np.array(times))}   peak RSS {max(peaks):.0f} MiB main process, "
          f"{max(trees):.0f} MiB with its workers (sampled every 20 ms)")
    print(_cpu_line(cpus, times))
    print(_parts_line(summary))


def bench_sweep(name, args, repeats):
    print(f"\n## sweep, {name}: python sweeps.py {' '.join(args)}")
    times, cpus = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            c0, t0 = _children_cpu(), time.perf_counter()
            subprocess.run([sys.executable, "sweeps.py", *args, "--outdir", os.path.join(out, "s")],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
            cpus.append(_children_cpu() - c0)
    print(f"wall {fmt(np.array(times))}")
    print(_cpu_line(cpus, times))


def bench_busy(repeats, seconds=240):
    """The default run while two other processes keep both cores busy, against the same run
    limited to one BLAS thread (the peer: BLAS threads must not make a busy machine slower).
    The busy processes stop by themselves after ``seconds``."""
    print("\n## default run on a busy machine (two CPU-bound processes), against one BLAS thread")
    spin = f"import time\nt = time.time()\nwhile time.time() - t < {seconds}: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        times = {"default": [], "one BLAS thread": []}
        for _ in range(repeats):
            for name, env in (("default", {}), ("one BLAS thread", {"OPENBLAS_NUM_THREADS": "1"})):
                with tempfile.TemporaryDirectory() as out:
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "vq_compare.py", "--quiet", "--outdir", out], cwd=ROOT,
                                   check=True, env={**os.environ, **env})
                    times[name].append(time.perf_counter() - t0)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    for name, t in times.items():
        print(f"{name:16s} wall {fmt(np.array(t))}")
    ratios = np.array(times["default"]) / np.array(times["one BLAS thread"])
    print(f"ratio default / one BLAS thread, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {np.median(ratios):.2f}")


REALISTIC = ["--D", "512", "--rank", "24", "--m", "16", "--K", "512", "--n_train", "100000",
             "--n_eval", "20000", "--steps", "500"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=["kmeans", "nearest", "memory", "data", "step", "scaling", "default",
                                                 "busy", "sweeps", "realistic"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if "kmeans" in a.only:
        bench_kmeans(a.repeats)
    if "nearest" in a.only:
        bench_nearest(a.repeats)
    if "memory" in a.only:
        bench_memory(a.repeats)
    if "data" in a.only:
        bench_data(a.repeats)
    if "step" in a.only:
        bench_step(a.repeats)
    if "scaling" in a.only:
        bench_scaling(a.repeats)
    if "default" in a.only:
        bench_end_to_end("default run", [], a.repeats)
        bench_end_to_end("the original's three methods",
                         ["--methods", "pca_lloyd", "fd_ste", "manual_ste"], a.repeats)
    if "busy" in a.only:
        bench_busy(a.repeats)
    if "sweeps" in a.only:
        bench_sweep("the original's comprehensive set", ["--preset", "original"], a.repeats)
        bench_sweep("smoke run", ["--quick"], a.repeats)
    if "realistic" in a.only:
        bench_end_to_end("realistic configuration", REALISTIC, 1)


if __name__ == "__main__":
    main()
