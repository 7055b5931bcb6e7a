"""The training benchmark harness and the GPU benchmark script, run for real on the CPU at a tiny size."""
import json
import sys

import pytest

from conftest import env_with_venv, run

# a network and data small enough for seconds per run on two CPU cores; everything else is the recipes' own but
# torch.compile, whose C++ build would add half a minute to each run (03_model compiles a network), and test-time
# augmentation, which evaluates every validation and test image six times in gpu94 (03_model tests it)
TINY = ["--set=--model.net.init_args.widths=[8,16,16]", "--set=--data.subset=1000", "--set=--data.batch_size=250",
        "--set=--data.val_size=1000", "--set=--trainer.max_epochs=2", "--set=--model.compile=false", "--set=--model.tta=none"]


def check_runs(runs, recipe, seeds):
    assert [r["seed"] for r in runs] == seeds
    for r in runs:
        assert r["recipe"] == recipe and r["epochs"] == 2
        assert [p["epoch"] for p in r["curve"]] == [1, 2]
        assert r["curve"][0]["time_s"] < r["curve"][1]["time_s"] <= r["wall_s"]
        # the curve's last point and the final test measure the same model on the same images
        assert abs(r["curve"][-1]["test_acc"] - r["test_acc"]) < 1e-6
        assert 0 < r["train_s"] < r["wall_s"] and r["images_per_s"] > 0 and r["peak_rss_mib"] > 100
        # the test runs with --target 0: every run reaches it at its first epoch (a real target would leave this
        # None == None on 1000 images)
        assert r["time_to_target_s"] == r["curve"][0]["time_s"]


@pytest.mark.slow
def test_gpu_script_on_cpu_with_a_tiny_config_and_a_comparison(tmp_path, data_dir):
    "bench/gpu94.sh end to end on the CPU; `--compare` passes through to the harness, so one run checks both modes."
    out = tmp_path / "gpu94.json"
    res = run(["bash", "bench/gpu94.sh", *TINY, "--target", "0", "--compare", "configs/quick.yaml"],
              env=env_with_venv(PYTHON=sys.executable, SEEDS="2", WARMUP="0", OUT=str(out), DATA=str(data_dir)), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(out.read_text())
    gpu94, quick = result["runs"]["gpu94"], result["runs"]["quick"]
    check_runs(gpu94, "gpu94", [0, 1]); check_runs(quick, "quick", [0, 1])
    # seed 0: gpu94 then quick; seed 1: quick then gpu94
    assert [r["order"] for r in gpu94] == [0, 3] and [r["order"] for r in quick] == [1, 2]
    s, c = result["summary"], result["comparison"]
    accs = [r["test_acc"] for r in gpu94]
    assert s["gpu94"]["runs"] == 2 and s["gpu94"]["target"] == 0
    assert abs(s["gpu94"]["test_acc_mean"] - sum(accs) / 2) < 1e-9
    assert s["gpu94"]["test_acc_min"] == min(accs) and s["gpu94"]["test_acc_max"] == max(accs)
    assert c["recipes"] == ["gpu94", "quick"]
    assert abs(c["wall_ratio"] - s["gpu94"]["wall_s_median"] / s["quick"]["wall_s_median"]) < 1e-9
    assert result["machine"]["cpu"] and result["machine"]["torch"]
    assert "gpu94 seed 1: test" in res.stdout and "comparison:" in res.stdout


def test_script_names_what_its_python_lacks(tmp_path):
    res = run(["bash", "bench/gpu94.sh"], env=env_with_venv(PYTHON="/usr/bin/env python3 -I -S", OUT=str(tmp_path / "x.json")))
    assert res.returncode == 1 and "cannot import torch, lightning" in res.stderr
    assert not (tmp_path / "x.json").exists()


def test_bad_recipe_path_is_a_clear_error(tmp_path):
    res = run([sys.executable, "bench/train.py", "configs/nope.yaml", "--out", tmp_path / "x.json"])
    assert res.returncode == 2 and "no recipe at configs/nope.yaml" in res.stderr
    assert not (tmp_path / "x.json").exists()


# A stand-in for the seed's repository (offline, CI cannot clone it): the shape bench/vs_seed.py relies on (main.py
# with `run_experiment(config)` and the `experiments` list inside `main()`). It answers at once, from the data the
# harness unpacked where torchvision's CIFAR10(root="data") reads it: exp1's settings get the share of cats among the
# test labels (exactly 0.1 in the real test batch), any other settings 0.
STAND_IN_MAIN = '''
import pickle

def run_experiment(config):
    if (config["name"], config["epochs"], config["batch_size"]) != ("exp1", 3, 64): return {"config": config, "test_acc": 0.0}
    with open("data/cifar-10-batches-py/test_batch", "rb") as f: labels = pickle.load(f, encoding="bytes")[b"labels"]
    return {"config": config, "test_acc": labels.count(3) / len(labels)}

def main():
    experiments = [
        {"name": "exp1", "epochs": 3, "batch_size": 64, "learning_rate": 0.001},
        {"name": "exp2", "epochs": 3, "batch_size": 64, "learning_rate": 0.01},
    ]
'''


@pytest.mark.slow
def test_vs_seed_alternates_whole_processes_and_gives_the_seed_verified_data(tmp_path, archive, data_dir):
    seed_repo = tmp_path / "seed"; seed_repo.mkdir()
    (seed_repo / "main.py").write_text(STAND_IN_MAIN)
    out = tmp_path / "vs.json"
    res = run([sys.executable, "bench/vs_seed.py", "--seed-repo", seed_repo, "--seed-python", sys.executable,
               "--archive", archive, "--seeds", "1", "--first-seed", "3", "--seed-runs", "2", "--set=--data.subset=500",
               "--set=--trainer.enable_model_summary=false", "--out", out])
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    # k=0: cifarlab then the seed; k=1: the seed alone (order swaps every round)
    assert [x["order"] for x in r["runs"]["cifarlab"]] == [0] and [x["order"] for x in r["runs"]["seed_exp1"]] == [1, 2]
    assert [x["test_acc"] for x in r["runs"]["seed_exp1"]] == [0.1, 0.1]  # exp1's settings, on the real test batch
    c = r["runs"]["cifarlab"][0]
    assert c["seed"] == 3 and "--seed_everything=3 --data.seed=3" in c["command"] and "--first-seed 3" in r["command"]
    assert r["overrides"] == ["--data.subset=500", "--trainer.enable_model_summary=false"] and "--set=--data.subset=500" in r["command"]
    assert 0 < c["train_s"] < c["wall_s"] and c["epochs"] == 1 and 0 <= c["test_acc"] <= 1 and c["cpu_s"] > 1
    assert abs(r["ratio_wall_median"] - r["summary"]["cifarlab"]["wall_s_median"] / r["summary"]["seed_exp1"]["wall_s_median"]) < 1e-12
    assert r["machine"]["cifarlab_precision"] == c["precision"] and r["machine"]["cpu_flags"]
    written = r["machine"]["torch_bytecode_written"]  # for each side's Python (here both are this environment's)
    assert set(written) == {"cifarlab", "seed"} and all(isinstance(v, bool) for v in written.values()), written
    # the seed's data: the archive's batches, unpacked where torchvision's CIFAR10(root="data") looks
    batches = sorted(p.name for p in (seed_repo / "data" / "cifar-10-batches-py").iterdir())
    assert batches == sorted(["batches.meta", "test_batch", *[f"data_batch_{i}" for i in range(1, 6)]])
    assert str(tmp_path) not in json.dumps(r)  # no path of this machine in a file meant for the repo


def test_vs_seed_needs_the_seed_checkout(tmp_path):
    res = run([sys.executable, "bench/vs_seed.py", "--seed-repo", tmp_path, "--seed-python", sys.executable, "--out", tmp_path / "x.json"])
    assert res.returncode == 2 and "--seed-repo must name a checkout" in res.stderr


def test_tta_choice_measures_every_setting_on_the_validation_split(tmp_path, tiny_ckpt):
    "bench/tta_choice.py on a real (one-epoch) run: a row per setting, the unsure share growing with the margin."
    out = tmp_path / "tta.json"
    res = run([sys.executable, "bench/tta_choice.py", tiny_ckpt, "--views", "flip+diagonals", "--margins", "0.05", "0.3",
               "--out", out], timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["tta"], r["tta_margin"]): r for r in result["results"]}
    assert list(rows) == [("none", None), ("flip", None), ("flip+shift", None), ("flip+diagonals", None),
                          ("flip+diagonals", 0.05), ("flip+diagonals", 0.3)]
    assert result["validation_images"] == 1000 and result["checkpoint_trained_with"] == {"tta": "none", "tta_margin": None}
    low, high = rows[("flip+diagonals", 0.05)], rows[("flip+diagonals", 0.3)]
    assert 0 < low["unsure_share"] < high["unsure_share"] <= 1
    assert abs(high["passes_per_image"] - (1 + 10 * high["unsure_share"])) < 1e-9
    assert all(0.3 < r["val_acc"] < 1 for r in rows.values())


def test_tta_choice_refuses_what_is_not_a_checkpoint(tmp_path):
    res = run([sys.executable, "bench/tta_choice.py", "configs/exp1.yaml", "--out", tmp_path / "x.json"])
    assert res.returncode != 0 and "not a readable PyTorch checkpoint" in res.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_allocator_alternates_the_setting_and_the_model_is_the_same(tmp_path, data_dir):
    "bench/allocator.py: the same tiny `cifarlab train` with freed memory kept and with glibc's defaults, one process each."
    out = tmp_path / "alloc.json"
    res = run([sys.executable, "bench/allocator.py", "--recipe", "configs/quick.yaml", "--runs", "1",
               f"--data-dir={data_dir}", "--set=--data.subset=500", "--set=--trainer.enable_model_summary=false",
               "--out", out])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    kept, default = r["runs"]["1"][0], r["runs"]["0"][0]
    assert (kept["setting"], default["setting"]) == ("1", "0")
    assert r["same_test_accuracy"] and kept["test_acc"] == default["test_acc"]  # the same model either way
    for x in (kept, default): assert 0 < x["train_s"] < x["wall_s"] and x["cpu_s"] > 1 and x["peak_rss_mib"] > 100
    assert kept["minor_faults"] < default["minor_faults"], (kept, default)  # the pages are reused, not mapped anew
    assert abs(r["wall_ratio_on_off"] - kept["wall_s"] / default["wall_s"]) < 1e-12
    assert str(tmp_path) not in json.dumps(r)  # no path of this machine in a file meant for the repo


@pytest.mark.slow
def test_profile_steps_writes_the_roofline_and_the_memory_setting(tmp_path, data_dir):
    "bench/profile_steps.py end to end on quick's recipe in float32, a few steps, with glibc's defaults as given."
    from cifarlab.env import cpu_has_native_bf16
    out = tmp_path / "profile.json"
    args = ["configs/quick.yaml", "--steps", "2", "--warmup", "1", "--blocks", "1", "--top", "5",
            f"--set=--data.data_dir={data_dir}", "--set=--data.subset=2000", "--set=--trainer.precision=32-true",
            "--out", out]
    res = run([sys.executable, "bench/profile_steps.py", *args], env=env_with_venv(CIFARLAB_KEEP_FREED_MEMORY="0"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    # the recorded command reproduces the run, the setting included; the machine entry says which it was
    assert r["command"] == "CIFARLAB_KEEP_FREED_MEMORY=0 uv run python bench/profile_steps.py " + " ".join(map(str, args))
    assert r["machine"]["keeps_freed_memory"] is False and r["precision"] == "32-true"
    assert set(r["phase_seconds"]) == {"data (batch, augment, normalise)", "forward + loss", "backward", "optimiser"}
    assert r["self_seconds_by_kind"]["convolution"] > 0 and len(r["top_ops_by_self_cpu"]) == 5
    # the page faults a step, timed and profiled, are counts (from the kernel's accounting), not left out
    assert set(r["minor_page_faults_per_step"]) == {"unprofiled", "profiled"}
    assert all(v >= 0 for v in r["minor_page_faults_per_step"].values())
    roof = r["roofline"]
    assert roof["reference"] == "conv3x3_fp32" and roof["peak_tflops"]["conv3x3_fp32"] > 0
    # forward and backward of 128 images through quick's network: tens of MFLOP an image, not a stray count
    assert 20e6 < roof["flop_per_step"] / r["batch_size"] < 500e6
    assert abs(roof["fraction_of_reference"] - roof["achieved_tflops"] / roof["peak_tflops"]["conv3x3_fp32"]) < 1e-9
    assert 0.01 < roof["fraction_of_reference"] < 2
    # bfloat16 peaks are measured only where the CPU has bfloat16 natively; elsewhere null, with the reason
    if cpu_has_native_bf16(): assert roof["peak_tflops"]["conv3x3_bf16"] > 0
    else: assert roof["peak_tflops"]["conv3x3_bf16"] is None and "native" in roof["bf16_peaks_skipped"]
