"""Training benchmark: test accuracy and time of a recipe over several seeds, or of two recipes side by side.

    uv run python bench/train.py configs/quick.yaml --seeds 3 --out bench/results/quick.json
    uv run python bench/train.py configs/quick.yaml --compare configs/exp1.yaml --seeds 3 --out bench/results/quick_vs_exp1.json
    uv run python bench/train.py configs/gpu94.yaml --seeds 5 --warmup --target 0.94 --out bench/results/gpu94.json

Each run goes through cifarlab's own pipeline (`run_recipe`: the LightningCLI objects `cifarlab fit` builds, with
`seed_everything` and `data.seed` set to the run's seed) in this process, after the imports. Per run it records:

- `wall_s`: building the model and data, training with the recipe's own validation, and the final test;
- `train_s`: the training steps alone (fit time less validation and less the curve below);
- `curve`: test accuracy after every epoch, measured for this benchmark only (never used to choose anything;
  its time is left out of every other figure), and `time_to_target_s`: the wall clock, less the curve's own
  time, at the end of the first epoch whose test accuracy reaches `--target` (the seed's 73.85% by default);
- `images_per_s` (training images over `train_s`), peak resident memory of the process (sampled) and, on a GPU,
  peak allocated device memory. Clocks are read with the GPU synchronised.

With `--compare`, the two recipes alternate seed by seed (and swap order every round), so load on a shared
machine falls on both, and the summary gives their ratios. Everything goes to one JSON file, written atomically.
"""
import argparse
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

SEED_ACCURACY = 0.7385  # the seed project's best: SimpleCnn, experiment 1, 3 epochs


def parse_args(argv=None):
    "The command line, checked before the slow imports below."
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the recipe (a cifarlab fit config)")
    ap.add_argument("--compare", metavar="CONFIG", help="a second recipe, run alternately with the first")
    ap.add_argument("--seeds", type=int, default=2, help="runs per recipe, seeds 0..N-1 (default 2)")
    ap.add_argument("--target", type=float, default=SEED_ACCURACY, help="test accuracy for time-to-target (default 0.7385)")
    ap.add_argument("--warmup", action="store_true", help="one untimed 1-epoch run of each recipe first (GPU kernels, caches)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="a LightningCLI override for every run, e.g. --set=--trainer.max_epochs=2 (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    for c in filter(None, (args.config, args.compare)):
        if not Path(c).is_file(): ap.error(f"no recipe at {c}")
    return args


if __name__ == "__main__": ARGS = parse_args()  # a bad command line fails at once, not after the imports

import lightning  # noqa: E402 (after the argument check above)
import psutil
import torch
from lightning.pytorch.callbacks import Callback

from cifarlab.cli import keep_freed_memory
from cifarlab.env import cpu_name, synchronize as sync
from cifarlab.experiments import run_recipe, write_results


class PeakMemory:
    "Peak resident memory of this process, sampled every 20 ms on a thread while in the `with` block."
    def __init__(self, every=0.02): self.every, self.peak = every, 0

    def _watch(self):
        proc = psutil.Process()
        while not self._stop.wait(self.every): self.peak = max(self.peak, proc.memory_info().rss)

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event(); self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start(); return self

    def __exit__(self, *exc):
        self._stop.set(); self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


class BenchClock(Callback):
    "Times validation, and measures test accuracy after each epoch (the curve) off the clock."
    def __init__(self, start, target):
        self.start, self.target = start, target
        self.val_s = self.curve_s = 0.0
        self.curve, self.time_to_target = [], None

    def on_validation_start(self, trainer, pl_module): sync(); self._t = time.perf_counter()
    def on_validation_end(self, trainer, pl_module): sync(); self.val_s += time.perf_counter() - self._t

    def elapsed(self):
        sync(); return time.perf_counter() - self.start - self.curve_s

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        clock, t0 = self.elapsed(), time.perf_counter()
        was_training = pl_module.training; pl_module.eval()
        correct = total = 0
        with trainer.precision_plugin.forward_context():
            for x, y in trainer.datamodule.test_dataloader():
                logits = pl_module.predict_step((x, y))
                correct += (logits.argmax(1) == y).sum().item(); total += len(y)
        pl_module.train(was_training)
        acc = correct / total
        self.curve.append({"epoch": trainer.current_epoch + 1, "time_s": clock, "test_acc": acc})
        if self.time_to_target is None and acc >= self.target: self.time_to_target = clock
        sync(); self.curve_s += time.perf_counter() - t0


def run_once(config, seed, target, overrides=(), root=None):
    "One seeded run of `config` through `run_recipe`; returns its record."
    clock = BenchClock(time.perf_counter(), target)
    args = [f"--seed_everything={seed}", f"--data.seed={seed}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}/{Path(config).stem}-seed{seed}", *overrides]
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem: rec = run_recipe(config, *args, callbacks=[clock])
    train_s = rec["train_time_s"] - clock.val_s - clock.curve_s
    return {"recipe": rec["recipe"], "config": str(config), "seed": seed, "overrides": list(overrides),
            "epochs": rec["epochs"], "test_acc": rec["test_acc"], "val_acc": rec["val_acc"],
            "wall_s": rec["wall_time_s"] - clock.curve_s, "train_s": train_s, "validation_s": clock.val_s,
            "time_to_target_s": clock.time_to_target, "images_per_s": rec["images_trained"] / train_s,
            "peak_rss_mib": mem.peak / 2**20,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "curve": clock.curve}


def summarise(runs, target):
    "Mean/min/max accuracy and median times of one recipe's runs."
    accs = [r["test_acc"] for r in runs]
    reached = [r["time_to_target_s"] for r in runs]
    med = lambda k: statistics.median(r[k] for r in runs)
    return {"runs": len(runs), "test_acc_mean": statistics.fmean(accs), "test_acc_min": min(accs),
            "test_acc_max": max(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "wall_s_median": med("wall_s"), "train_s_median": med("train_s"),
            "train_s_max": max(r["train_s"] for r in runs), "images_per_s_median": med("images_per_s"),
            "target": target, "reached_target": sum(t is not None for t in reached),
            # a median over runs that all reached the target; otherwise the target was not reliably reached
            "time_to_target_s_median": statistics.median(reached) if all(t is not None for t in reached) else None,
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
            "peak_cuda_mib_max": max((r["peak_cuda_mib"] or 0) for r in runs) or None}


def machine():
    return {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "logical_cpus": psutil.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version()}


def main(argv=None):
    args = ARGS if argv is None else parse_args(argv)
    keep_freed_memory()  # as the `cifarlab` command's training does, so the runs here are the runs users get
    configs = [args.config] + ([args.compare] if args.compare else [])
    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning").setLevel(logging.ERROR)

    runs = {Path(c).stem: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="cifarlab-bench-") as root:
        if args.warmup:
            for c in configs: run_once(c, 0, args.target, [*args.overrides, "--trainer.max_epochs=1"], root)
        for seed in range(args.seeds):
            for c in configs if seed % 2 == 0 else configs[::-1]:
                r = run_once(c, seed, args.target, args.overrides, root)
                r["order"] = sum(map(len, runs.values()))  # position in the sequence of timed runs
                runs[r["recipe"]].append(r)
                ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f} s"
                print(f"{r['recipe']:>10} seed {seed}: test {r['test_acc']:.4f}  wall {r['wall_s']:.1f} s  "
                      f"train {r['train_s']:.1f} s  to {args.target:.2%}: {ttt}", flush=True)

    summary = {name: summarise(rs, args.target) for name, rs in runs.items()}
    result = {"benchmark": "cifarlab training: test accuracy and time per seeded run",
              "command": "uv run python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "target": args.target, "summary": summary, "runs": runs}
    if args.compare:
        a, b = (summary[Path(c).stem] for c in configs)
        result["comparison"] = {
            "recipes": [Path(c).stem for c in configs],
            "time_to_target_over_other_wall": (a["time_to_target_s_median"] / b["wall_s_median"]
                                               if a["time_to_target_s_median"] is not None else None),
            "time_to_target_ratio": (a["time_to_target_s_median"] / b["time_to_target_s_median"]
                                     if None not in (a["time_to_target_s_median"], b["time_to_target_s_median"]) else None),
            "wall_ratio": a["wall_s_median"] / b["wall_s_median"],
            "train_ratio": a["train_s_median"] / b["train_s_median"],
            "test_acc_difference": a["test_acc_mean"] - b["test_acc_mean"]}
    write_results(result, args.out)
    for name, s in summary.items():
        print(f"{name}: test {s['test_acc_mean']:.4f} mean ({s['test_acc_min']:.4f}-{s['test_acc_max']:.4f}), "
              f"wall {s['wall_s_median']:.1f} s, train {s['train_s_median']:.1f} s median")
    if args.compare: print("comparison:", result["comparison"])
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
