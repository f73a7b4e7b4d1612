import sys; sys.path.insert(0, "/work/main")
import time, numpy as np, vq_compare as vq
cfg = vq.make_config(workers=1, n_init=1)
p = vq.make_problem(cfg)
run = vq.Run(p, "manual_ste")
Xb = p.X_train[:1024]
def t(f, r=100):
    f(); t0 = time.perf_counter()
    for _ in range(r): f()
    return (time.perf_counter() - t0) / r * 1e3
m, hp = run.method, run.hp
fr = m.freeze(run.W, None, run.params, Xb, hp, None)
print(f"freeze {t(lambda: m.freeze(run.W, None, run.params, Xb, hp, None)):.3f} ms",
      f"grads {t(lambda: m.loss_and_grads(run.W, None, run.params, Xb, fr, hp)):.3f}",
      f"eval_row {t(lambda: run.eval_row(1), 20):.3f}",
      f"fd {t(lambda: vq.METHODS['fd_ste'].loss_and_grads(run.W, None, run.params, Xb, fr, hp), 20):.3f}",
      f"latents_eval {t(lambda: vq.latents(p.X_eval, run.W)):.3f}",
      f"riem {t(lambda: vq.riemannian_step(run.W, run.W, 0.1)):.3f}")
