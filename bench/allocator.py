"""Freed memory kept for reuse, on and off: the same `cifarlab train` command as whole processes with
CIFARLAB_KEEP_FREED_MEMORY=1 (as the `cifarlab` command trains unless told otherwise: the C library's malloc keeps what
the process frees, 07_cli's `keep_freed_memory`) and =0 (glibc's defaults), alternated, into one JSON file.

    uv run python bench/allocator.py --recipe configs/airbench94.yaml --runs 3 --set=--trainer.max_epochs=2 --set=--trainer.limit_train_batches=10 --set=--trainer.limit_test_batches=2 --out bench/results/allocator.json

Per process, from the kernel's own accounting of it and its children (`os.wait4` on `uv run`): wall time, CPU
seconds (and the kernel's share of them, where page faults are served), minor page faults and peak resident
memory; and the test accuracy from the run's train.json, which must be the same both ways, since the setting moves
memory, not arithmetic. `--set` options (repeatable) go to every run: a few training and test batches keep the
benchmark to minutes while timing the steps a full run repeats.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_seed import REPO, machine, shown, train_command, train_record  # the whole-command harness's pieces

SETTING = "CIFARLAB_KEEP_FREED_MEMORY"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="configs/airbench94.yaml", help="cifarlab recipe (default configs/airbench94.yaml)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each setting, alternated (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    ap.add_argument("--data-dir", default="data/cifar10", help="cifarlab's prepared data (default data/cifar10)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="an extra option for every run, e.g. --set=--trainer.limit_train_batches=10 (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if not Path(args.recipe).is_file(): ap.error(f"no recipe at {args.recipe}")
    if args.runs < 1: ap.error("--runs must be at least 1")
    return args


def run(args, value, root, k):
    "One whole `cifarlab train` process with CIFARLAB_KEEP_FREED_MEMORY=`value`: its figures, from the kernel's rusage."
    run_dir = root / f"keep{value}-{k}"
    cmd = train_command(args, args.seed, run_dir)
    log = root / f"keep{value}-{k}.log"
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, SETTING: value})
        _, status, usage = os.wait4(proc.pid, 0)  # this process and the ones it waited for (uv's child: cifarlab)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output is in {log}:\n{log.read_text()[-2000:]}")
    rec = train_record(run_dir)
    return {"setting": value, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "kernel_cpu_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "peak_rss_mib": usage.ru_maxrss / 1024, "test_acc": rec["test_acc"], "train_s": rec["train_time_s"],
            "images_trained": rec.get("images_trained")}


def summarise(runs):
    med = lambda key: statistics.median(r[key] for r in runs)
    return {"runs": len(runs), "wall_s_median": med("wall_s"), "cpu_s_median": med("cpu_s"),
            "kernel_cpu_s_median": med("kernel_cpu_s"), "train_s_median": med("train_s"),
            "minor_faults_median": med("minor_faults"), "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
            "test_accs": sorted({r["test_acc"] for r in runs})}


def main(argv=None):
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="allocator-"))
    runs = {"1": [], "0": []}
    for k in range(args.runs):
        for value in (("1", "0") if k % 2 == 0 else ("0", "1")):  # alternate which setting goes first
            r = run(args, value, root, k)
            runs[value].append(r)
            print(f"{SETTING}={value} run {k}: whole process {r['wall_s']:.1f} s  cpu {r['cpu_s']:.0f} s "
                  f"(kernel {r['kernel_cpu_s']:.0f} s)  minor faults {r['minor_faults']:,}  peak {r['peak_rss_mib']:,.0f} MiB  "
                  f"test {r['test_acc']:.4f}", flush=True)
    summary = {value: summarise(rs) for value, rs in runs.items()}
    accs = {a for s in summary.values() for a in s["test_accs"]}
    result = {"benchmark": "freed memory kept for reuse: whole cifarlab train processes, on and off, alternated",
              "recipe": args.recipe, "options": args.overrides, "seed": args.seed,
              "machine": machine(),
              "summary": summary, "runs": runs,
              "same_test_accuracy": len(accs) == 1,
              "wall_ratio_on_off": summary["1"]["wall_s_median"] / summary["0"]["wall_s_median"],
              "command": " ".join(["uv run python bench/allocator.py --recipe", args.recipe, "--runs", str(args.runs)]
                                  + ([f"--seed {args.seed}"] if args.seed else [])
                                  + [f"--set={o}" for o in args.overrides] + ["--out", shown(args.out)])}
    from cifarlab.experiments import write_results
    write_results(result, args.out)
    shutil.rmtree(root)
    print(f"on / off, median whole-process wall time: {result['wall_ratio_on_off']:.3f}; "
          f"test accuracy the same both ways: {result['same_test_accuracy']}")
    print(f"wrote {args.out}")
    if not result["same_test_accuracy"]: sys.exit(f"the two settings gave different test accuracies: {sorted(accs)}")


if __name__ == "__main__":
    main()
