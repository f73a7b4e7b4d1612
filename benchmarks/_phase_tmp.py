import sys; sys.path.insert(0, "/work/main")
import time, vq_compare as vq
if __name__ == "__main__":
    t = time.perf_counter()
    cfg = vq.make_config(workers=0)
    p = vq.make_problem(cfg)
    out = {"problem": time.perf_counter() - t}
    for n in cfg.methods:
        t0 = time.perf_counter()
        m = vq.METHODS[n]; hp = vq.hyperparameters(cfg, n)
        r = m.fit(p, hp) if m.fit else vq.train(p, n)
        out[n] = time.perf_counter() - t0
    t0 = time.perf_counter(); vq.check_gradients(p, cfg.methods); out["check"] = time.perf_counter() - t0
    t0 = time.perf_counter(); s = vq.compare(p); out["compare_all"] = time.perf_counter() - t0
    t0 = time.perf_counter(); vq.plot_comparison(s); vq.plot_training_curves(s); out["plots"] = time.perf_counter() - t0
    print(" ".join(f"{k} {v:.2f}" for k, v in out.items()))
    