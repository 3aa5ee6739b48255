"""Shared timing helpers for benchmarks: interleaved repeats, median, one JSON line out."""

import json
import platform
import statistics
import time
from datetime import date

import torch


def timed(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns, repeats=3, warmup=1):
    """Median seconds of each callable, measured alternately so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def sync(device):
    """Wait for a GPU's queued work, so a timer read after it counts that work."""
    if device == "cuda":
        torch.cuda.synchronize()


def emit(name, **figures):
    record = {"benchmark": name, "date": date.today().isoformat(), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **figures}
    print(json.dumps(record))
