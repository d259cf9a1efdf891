"""numpy C = A @ B in one process with T BLAS threads. Prints one JSON line.
Usage: python bench/_numpy_baseline.py THREADS SIZE REPEATS"""

import json
import os
import sys
import time

threads, size, repeats = (int(x) for x in sys.argv[1:4])
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(threads)

import numpy as np  # noqa: E402

rng = np.random.default_rng(0)
a = rng.standard_normal((size, size))
b = rng.standard_normal((size, size))
a @ b  # warm-up
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
print(json.dumps({"threads": threads, "n": size, "times": times}))
