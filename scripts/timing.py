"""Timing shared by the PyTorch twins' sampling and evaluation benchmarks."""
import json
import resource
import time

import numpy as np


def report_images_per_s(call, n, warmup, repeats):
    """Times `warmup + repeats` calls of `call()` (each handling `n` images) and prints the median
    of the last `repeats` as JSON: seconds, images per second, peak RSS."""
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    print(json.dumps({"median_s": med, "images_per_s": n / med,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
