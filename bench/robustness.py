"""Time `cifarlab robustness` as a user meets it: the whole command from the shell, start-up included, once with the
corrupted sets made from nothing (a fresh cache folder: the first run on a machine) and once with them cached (every
later run), repeated in turns; medians, with the machine and the results each run gave (which must agree).

    uv run python bench/robustness.py --model model.onnx [--repeats 2] [--out bench/results/robustness.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cifarlab.core import write_json
from cifarlab.env import cpu_flags, cpu_name

CIFARLAB = Path(sys.executable).with_name("cifarlab")


def run(model, data_dir, cache, out, per_class):
    "One whole `cifarlab robustness` process: (wall seconds, its results)."
    t0 = time.perf_counter()
    res = subprocess.run([CIFARLAB, "robustness", model, "--data_dir", data_dir, "--cache_dir", cache, "--out", out,
                          "--per_class", str(per_class)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode: sys.exit(f"cifarlab robustness failed:\n{res.stderr}")
    return wall, json.loads(Path(out).read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="model.onnx")
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/robustness.json")
    a = ap.parse_args()
    runs = {"cold": [], "warm": []}
    results = []
    with tempfile.TemporaryDirectory(prefix="cifarlab-robustness-") as tmp:
        for i in range(a.repeats):
            cache = Path(tmp) / f"cache-{i}"  # new each repeat: the cold run makes every set, the warm one reads them
            for kind in ("cold", "warm"):
                wall, r = run(a.model, a.data_dir, cache, Path(tmp) / "r.json", a.per_class)
                runs[kind].append(wall)
                results.append((r["sha256"], r["mean_corruption_accuracy"], r["accuracy"]))
                print(f"{kind}: {wall:.1f} s (mean corruption accuracy {r['mean_corruption_accuracy']:.4f})", flush=True)
    if len({json.dumps(x) for x in results}) != 1: sys.exit("the runs gave different results")
    sha, mean, _ = results[0]
    write_json(a.out, {
        "benchmark": "cifarlab robustness, the whole command timed from outside: corrupted sets made (cold) and cached (warm)",
        "command": " ".join(["uv run python bench/robustness.py", *sys.argv[1:]]),
        "model_sha256": sha, "images_per_cell": 10 * a.per_class, "cells": 75, "mean_corruption_accuracy": mean,
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))},
        "summary": {kind: {"runs": len(w), "wall_s_median": statistics.median(w), "wall_s_max": max(w)}
                    for kind, w in runs.items()},
        "runs": runs})


if __name__ == "__main__":
    main()
