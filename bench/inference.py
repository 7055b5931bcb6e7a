"""CPU inference: ONNX Runtime against PyTorch for the same model, in one run: single-image latency (p50/p99) and
batch throughput, on real CIFAR-10 test images.

    uv run python bench/inference.py CKPT [--model model.onnx] [--single 500] [--batch-size 256] [--out bench/results/inference.json]

Both sides compute the same thing, uint8 RGB images -> logits: the PyTorch side is `cifarlab.export.Deployable` (the
data module's normalisation, then the model's test-time path) under `torch.inference_mode`; the ONNX Runtime side is
the exported file, which must come from the same checkpoint (its recorded sha256 is checked; without `--model` the
checkpoint is exported to a temporary file first). Both run with one thread (how a server that handles requests in
parallel runs them) and with one thread per CPU (how a batch job runs them). Single-image latency times one call per
image for `--single` images, alternating the two libraries image by image so that load from elsewhere on the machine
falls on both; throughput is the median over `--repeats` passes over the whole test set in batches of `--batch-size`,
again alternating.
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cifarlab.contract import open_model
from cifarlab.env import cpu_name
from cifarlab.evaluate import load_run
from cifarlab.experiments import write_results
from cifarlab.export import Deployable, checkpoint_facts, export_checkpoint


def percentiles(seconds):
    ms = 1000 * np.array(seconds)
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path, help="Lightning checkpoint written by `cifarlab fit`")
    ap.add_argument("--model", type=Path, help="its ONNX export (default: export it to a temporary file)")
    ap.add_argument("--data-dir", default=None, help="prepared CIFAR-10 (default: the run's own)")
    ap.add_argument("--single", type=int, default=500, help="images timed one by one")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the test set for throughput")
    ap.add_argument("--out", type=Path, default=Path("bench/results/inference.json"))
    args = ap.parse_args()

    facts = checkpoint_facts(args.ckpt)
    model_path = args.model or Path(tempfile.mkdtemp()) / "model.onnx"
    if args.model is None: export_checkpoint(args.ckpt, model_path, args.data_dir, limit=1000)
    if open_model(model_path).contract["source"].get("sha256") != facts["sha256"]:
        sys.exit(f"{model_path} was not exported from {args.ckpt}: pass the matching --model")

    model, dm = load_run(args.ckpt, args.data_dir)
    images = dm.splits["test"][0].numpy()
    net = Deployable(model, dm.mean, dm.std).eval()

    results = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        sess = open_model(model_path, threads=threads).session
        libs = {"torch": lambda x: net(torch.from_numpy(x)).numpy(), "onnxruntime": lambda x: sess.run(None, {"image": x})[0]}
        with torch.inference_mode():
            diff = float(np.abs(libs["torch"](images[:256]) - libs["onnxruntime"](images[:256])).max())
            for f in libs.values():  # warm-up: first calls allocate memory and pick kernels
                for i in range(20): f(images[i:i + 1])
                f(images[:args.batch_size])
            single = {name: [] for name in libs}
            for i in range(args.single):
                for name, f in libs.items():
                    t0 = time.perf_counter(); f(images[i:i + 1]); single[name].append(time.perf_counter() - t0)
            rates = {name: [] for name in libs}
            for _ in range(args.repeats):
                for name, f in libs.items():
                    t0 = time.perf_counter()
                    for i in range(0, len(images), args.batch_size): f(images[i:i + args.batch_size])
                    rates[name].append(len(images) / (time.perf_counter() - t0))
        lat = {name: percentiles(v) for name, v in single.items()}
        thr = {name: statistics.median(v) for name, v in rates.items()}
        results[f"{threads}_threads"] = {
            "threads": threads, "max_abs_logit_diff_on_256_images": diff,
            "single_image_latency_ms": lat, "batch_images_per_second": thr, "batch_images_per_second_all": rates,
            "onnxruntime_speedup": {"single_image_p50": lat["torch"]["p50"] / lat["onnxruntime"]["p50"],
                                    "batch_throughput": thr["onnxruntime"] / thr["torch"]}}
        for name in libs:
            print(f"{threads} thread(s) {name:12s} single image p50 {lat[name]['p50']:7.2f} ms, p99 {lat[name]['p99']:7.2f} ms;"
                  f" batch {args.batch_size}: {thr[name]:6.0f} images/s")

    result = {
        "benchmark": "CPU inference, uint8 CIFAR-10 test images -> logits: ONNX Runtime vs PyTorch, same checkpoint",
        # files by name only: where they lived on the machine that ran it means nothing elsewhere
        "command": f"uv run python bench/inference.py {args.ckpt.name} --model {model_path.name} --single {args.single} "
                   f"--batch-size {args.batch_size} --repeats {args.repeats}",
        "model": {"net": facts["net"], "checkpoint_sha256": facts["sha256"], "tta": facts["tta"]},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "python": platform.python_version()},
        "single_images": args.single, "batch_size": args.batch_size, "repeats": args.repeats,
        "images_per_pass": len(images), "results": results,
    }
    write_results(result, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
