import sys; sys.path.insert(0, "/work/main")
import cProfile, pstats, io, vq_compare as vq
cfg = vq.make_config(workers=1, n_init=1)
p = vq.make_problem(cfg)
pr = cProfile.Profile(); pr.enable()
for n in ("fd_ste", "manual_ste", "rotation"):
    vq.train(p, n)
pr.disable()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[-2600:])
