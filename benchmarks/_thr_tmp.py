import time, numpy as np
rng = np.random.default_rng(0)
W = rng.standard_normal((4, 64))
def t(f, r=300):
    f(); t0 = time.perf_counter()
    for _ in range(r): f()
    return (time.perf_counter() - t0) / r * 1e6
out = []
for n in (256, 512, 1000, 1023, 1024, 1025, 2048, 4096):
    X = rng.standard_normal((n, 64))
    out.append(f"{n}:{t(lambda: W @ X.T):.0f}us")
A = rng.standard_normal((1024, 4)); X = rng.standard_normal((1024, 64))
out.append(f"AtX:{t(lambda: A.T @ X):.0f}us")
X = rng.standard_normal((1024, 64)); out.append(f"XtX:{t(lambda: X.T @ X):.0f}us")
print(" ".join(out))
