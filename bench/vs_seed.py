"""The user's whole command against the seed's: the seed project's own `main.py` experiment 1 (its code unchanged:
train, then test, in one process) and `cifarlab train -c RECIPE`, alternated run by run, each timed from outside
as a whole process (start-up, imports, data, training, test), into one JSON file with the machine's CPU flags.

    uv run python bench/vs_seed.py --seed-repo SEED --seed-python SEED_PYTHON --seeds 3 --out bench/results/quick_vs_seed.json
    uv run python bench/vs_seed.py --recipe configs/fast.yaml --seeds 2 --seed-runs 0 --out bench/results/fast_whole_command.json

SEED is a checkout of the seed's public repository (LAjoyan/ML-Framework-lab) in a scratch folder outside this
repository (its code is never copied here); SEED_PYTHON a Python that imports what its `main.py` needs, made with
the same torch as cifarlab's so the two sides differ in their code alone:

    uv venv SCRATCH/env --python 3.11
    uv pip install --compile-bytecode --python SCRATCH/env/bin/python torch==<cifarlab's> torchvision pytorch-lightning==<cifarlab's lightning>

The harness verifies CIFAR-10 (the archive `cifarlab data` uses: `--archive` or $CIFARLAB_ARCHIVE) and unpacks it
as SEED/data/cifar-10-batches-py, where the seed's code reads it. A faithful archive whose batch files differ in
bytes from the official ones (not in content) fails torchvision's per-file md5 check, so the seed's process
replaces that check after this harness has verified every batch's pixels and labels by their fingerprints.
Experiment 1's settings are read from the seed's `main.py` itself. cifarlab's runs get `--seed_everything=S
--data.seed=S` for seeds 0..N-1 (K..K+N-1 with `--first-seed K`, so that a slow machine can add seeds to an
earlier file's in a later sitting) and their own run folder; their accuracy is read from the run's `train.json`.
The seed's runs seed only their validation split (as its code does), so they vary in initialisation only.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Run in the seed's process, with the seed's checkout as the working folder: its main.py is imported, not changed.
SEED_RUNNER = """
import ast, sys
try:  # torchvision compares the batch files' bytes with the official archive's; the harness checked their content
    import torchvision.datasets.cifar as tv_cifar
    tv_cifar.CIFAR10._check_integrity = lambda self: True
except ImportError: pass
sys.path.insert(0, ".")
import main
tree = ast.parse(open("main.py").read())
experiments = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "experiments")
result = main.run_experiment(next(e for e in experiments if e["name"] == "exp1"))
print("VS_SEED_TEST_ACC", float(result["test_acc"]))
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="configs/quick.yaml", help="cifarlab recipe (default configs/quick.yaml)")
    ap.add_argument("--seeds", type=int, default=3, help="cifarlab runs, seeds 0..N-1 (default 3)")
    ap.add_argument("--first-seed", type=int, default=0, metavar="K",
                    help="start cifarlab's seeds at K (K..K+N-1), to add seeds to an earlier file's (default 0)")
    ap.add_argument("--seed-runs", type=int, default=2, help="runs of the seed's exp1 (default 2; 0: cifarlab alone)")
    ap.add_argument("--seed-repo", type=Path, help="checkout of the seed's repository (needed unless --seed-runs 0)")
    ap.add_argument("--seed-python", default=None, help="the Python that runs the seed's code")
    ap.add_argument("--archive", default=os.environ.get("CIFARLAB_ARCHIVE"), help="cifar-10-python.tar.gz (default $CIFARLAB_ARCHIVE)")
    ap.add_argument("--data-dir", default="data/cifar10", help="cifarlab's prepared data (default data/cifar10)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="an extra option for every cifarlab run, e.g. --set=--data.subset=600 (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if not Path(args.recipe).is_file(): ap.error(f"no recipe at {args.recipe}")
    if args.seed_runs:
        if not args.seed_repo or not (args.seed_repo / "main.py").is_file():
            ap.error("--seed-repo must name a checkout of the seed's repository (with its main.py)")
        if not args.seed_python: ap.error("--seed-python is needed to run the seed's code")
        if not args.archive: ap.error("--archive (or $CIFARLAB_ARCHIVE) is needed to give the seed its data")
    return args


def seed_data(seed_repo, archive):
    "Verify `archive` (every batch's content fingerprint) and unpack it as the seed's data folder."
    from cifarlab.data import BATCH_DIR, SPLIT_BATCHES, read_archive
    read_archive(archive, progress=False)  # cifarlab's own check: raises DataError unless every batch is the real one
    dest = seed_repo / "data" / BATCH_DIR
    names = [n for split in SPLIT_BATCHES.values() for n in split]
    with tarfile.open(archive, "r:*") as tar:
        staging = Path(tempfile.mkdtemp(dir=seed_repo))
        tar.extractall(staging, members=[tar.getmember(f"{BATCH_DIR}/{n}") for n in [*names, "batches.meta"]], filter="data")
    shutil.rmtree(dest, ignore_errors=True); dest.parent.mkdir(exist_ok=True)
    (staging / BATCH_DIR).rename(dest); staging.rmdir()


def timed(cmd, cwd, log):
    "Run `cmd` as a whole process; its wall time, CPU seconds and output (also written to `log`)."
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = res.stdout + res.stderr
    log.write_text(out)
    if res.returncode: sys.exit(f"{' '.join(map(str, cmd))} failed (exit {res.returncode}); its output is in {log}:\n{out[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, res.stdout


def cifarlab_command():
    "How a user runs cifarlab: `uv run cifarlab` where uv is installed, else this environment's console script."
    uv = shutil.which("uv")
    return [uv, "run", "--locked", "cifarlab"] if uv else [str(Path(sys.executable).parent / "cifarlab")]


def train_command(args, seed, run_dir):
    "`cifarlab train` of `args.recipe` at `seed` (with `args.overrides`), its run in `run_dir`, as a user types it."
    return [*cifarlab_command(), "train", "-c", args.recipe, f"--seed_everything={seed}", f"--data.seed={seed}",
            f"--data.data_dir={args.data_dir}", f"--trainer.default_root_dir={run_dir}", *args.overrides]


def train_record(run_dir):
    "The record (train.json) that a `cifarlab train` run left in `run_dir`."
    return json.loads(next(run_dir.rglob("train.json")).read_text())


def run_cifarlab(args, seed, root):
    run_dir = root / f"{Path(args.recipe).stem}-seed{seed}"
    cmd = train_command(args, seed, run_dir)
    wall, cpu, _ = timed(cmd, REPO, root / f"cifarlab-seed{seed}.log")
    rec = train_record(run_dir)
    return {"seed": seed, "wall_s": wall, "cpu_s": cpu, "test_acc": rec["test_acc"], "val_acc": rec["val_acc"],
            "train_s": rec["train_time_s"], "epochs": rec["epochs"], "precision": rec["precision"],
            "command": " ".join(cmd[cmd.index("train") - 1:]).replace(str(run_dir), "RUN")}


def run_seed(args, k, root):
    wall, cpu, out = timed([args.seed_python, "-c", SEED_RUNNER], args.seed_repo, root / f"seed-exp1-{k}.log")
    acc = float(next(l.split()[1] for l in out.splitlines() if l.startswith("VS_SEED_TEST_ACC")))
    return {"run": k, "wall_s": wall, "cpu_s": cpu, "test_acc": acc}


def summarise(runs):
    accs, walls = [r["test_acc"] for r in runs], [r["wall_s"] for r in runs]
    return {"runs": len(runs), "test_acc_mean": statistics.mean(accs), "test_acc_min": min(accs), "test_acc_max": max(accs),
            "wall_s_median": statistics.median(walls), "wall_s_max": max(walls),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in runs)}


def shown(path):
    "`path` as the JSON records it: relative to the repository, or its name alone (no folder of this machine)."
    try: return str(Path(path).resolve().relative_to(REPO))
    except ValueError: return Path(path).name


# Whether a Python finds torch's bytecode written: without it (and with PYTHONDONTWRITEBYTECODE set) every process
# compiles torch and Lightning again, seconds of each whole command. Asked without importing torch.
HAS_BYTECODE = ("import importlib.util as u, os; s = u.find_spec('torch'); "
                "print(bool(s) and os.path.exists(u.cache_from_source(s.origin)))")


def bytecode_written(python):
    res = subprocess.run([str(python), "-c", HAS_BYTECODE], capture_output=True, text=True)
    return res.stdout.strip() == "True"


def machine(seed_python=None):
    "The machine and the two Pythons, as the JSON records them."
    from cifarlab.env import cpu_flags, cpu_name, training_precision
    import torch
    flags = cpu_flags()
    bytecode = {"cifarlab": bytecode_written(sys.executable)}
    if seed_python: bytecode["seed"] = bytecode_written(seed_python)
    return {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
            "cifarlab_precision": training_precision(), "torch": torch.__version__, "python": platform.python_version(),
            "PYTHONDONTWRITEBYTECODE": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")), "torch_bytecode_written": bytecode}


def main(argv=None):
    args = parse_args(argv)
    if args.seed_runs: seed_data(args.seed_repo, args.archive)
    root = Path(tempfile.mkdtemp(prefix="vs_seed-"))
    runs = {"cifarlab": [], "seed_exp1": []}
    order = 0
    for k in range(max(args.seeds, args.seed_runs)):
        jobs = [("cifarlab", args.first_seed + k) for _ in [0] if k < args.seeds] + [("seed_exp1", k) for _ in [0] if k < args.seed_runs]
        for who, i in (jobs if k % 2 == 0 else jobs[::-1]):  # alternate who goes first
            r = run_cifarlab(args, i, root) if who == "cifarlab" else run_seed(args, i, root)
            r["order"] = order; order += 1
            runs[who].append(r)
            print(f"{who:>9} {i}: test {r['test_acc']:.4f}  whole process {r['wall_s']:.1f} s  cpu {r['cpu_s']:.0f} s", flush=True)
    summary = {who: summarise(rs) for who, rs in runs.items() if rs}
    result = {"benchmark": "whole processes: the seed's main.py exp1 against cifarlab train, alternated",
              "recipe": args.recipe, "overrides": args.overrides,
              "machine": machine(args.seed_python if args.seed_runs else None), "summary": summary, "runs": runs,
              "command": " ".join(["uv run python bench/vs_seed.py --recipe", args.recipe, "--seeds", str(args.seeds),
                                   "--seed-runs", str(args.seed_runs)]
                                  + ([f"--first-seed {args.first_seed}"] if args.first_seed else [])
                                  + (["--seed-repo SEED --seed-python SEED_PYTHON"] if args.seed_runs else [])
                                  + [shlex.quote(f"--set={o}") for o in args.overrides] + ["--out", shown(args.out)])}
    if args.seed_runs:
        seed_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.seed_repo, capture_output=True, text=True).stdout.strip()
        result["seed"] = {"repository": "LAjoyan/ML-Framework-lab", "commit": seed_commit or None, "experiment": "exp1"}
        result["ratio_wall_median"] = summary["cifarlab"]["wall_s_median"] / summary["seed_exp1"]["wall_s_median"]
        print(f"cifarlab / seed, median whole-process wall time: {result['ratio_wall_median']:.3f}")
    from cifarlab.experiments import write_results
    write_results(result, args.out)
    shutil.rmtree(root)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
