import sys; sys.path.insert(0, "/work/main")
import time, numpy as np, vq_compare as vq, cProfile, pstats
X = vq.make_lowrank_data(64, 6, 20000, 10, 0)[0]
W = vq.pca_encoder(X, 4); Z = vq.latents(X, W)
args = vq.restart_args(Z, 32, np.random.default_rng(0), 8, 300)
cProfile.run("[vq.kmeans_restart(*a) for a in args]", "/tmp/km.prof")
pstats.Stats("/tmp/km.prof").sort_stats("tottime").print_stats(15)
