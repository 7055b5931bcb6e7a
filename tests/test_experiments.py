"""Training from the shell: Lightning CLI semantics on the real data, a run killed with SIGKILL that resumes where it
stopped, `cifarlab test`/`validate` on a checkpoint, and DDP on two CPU processes where each rank trains on its own shard."""
import json
import re
import signal
import subprocess
import time

import pandas as pd
import pytest
import torch

from cifarlab.cli import main
from cifarlab.evaluate import load_run, predict_test_split
from conftest import BIN, ROOT, env_with_venv, run

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit(*args, timeout=600):
    return run([BIN / "cifarlab", "fit", *args, *QUIET], timeout=timeout)


def test_fast_dev_run(data_dir, tmp_path):
    res = fit("-c", "configs/exp1.yaml", "--trainer.fast_dev_run=true", f"--data.data_dir={data_dir}",
              f"--trainer.default_root_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fast_dev_run" in res.stderr + res.stdout


def test_bad_override_is_a_clear_error(data_dir, tmp_path):
    res = fit("-c", "configs/exp1.yaml", "--model.optimizer=rmsprop", f"--data.data_dir={data_dir}",
              f"--trainer.default_root_dir={tmp_path}")
    assert res.returncode != 0 and "rmsprop" in res.stderr and "'adam', 'sgd'" in res.stderr, res.stderr[-2000:]


def last_checkpoint(root):
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(data_dir, tmp_path):
    args = ["-c", "configs/exp1.yaml", f"--data.data_dir={data_dir}", "--data.subset=1600", "--trainer.max_epochs=3",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]
    proc = subprocess.Popen([BIN / "cifarlab", "fit", *args], cwd=ROOT, env=env_with_venv(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the first epoch's checkpoint appears; the second epoch is then under way: kill it there
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL); proc.wait(30)
    finally:
        if proc.poll() is None: proc.kill()
    killed_at = last_checkpoint(tmp_path)["epoch"]
    assert killed_at < 2, "killed after the last epoch: nothing to resume"

    res = fit(*args, "--ckpt_path=last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Restoring states from the checkpoint" in res.stderr + res.stdout
    done = last_checkpoint(tmp_path)
    steps_per_epoch = 1600 // 64
    assert done["epoch"] == 2 and done["global_step"] == 3 * steps_per_epoch
    # the resumed run (the newest log) trained only the epochs after the checkpoint: none again, none from scratch
    logs = sorted((tmp_path / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    resumed = pd.read_csv(logs[-1] / "metrics.csv")
    assert sorted(resumed.dropna(subset=["train_loss"]).epoch) == list(range(killed_at + 1, 3)), resumed


@pytest.mark.slow
def test_ddp_two_cpu_processes(data_dir, tmp_path):
    probe = tmp_path / "probe.yaml"  # tests/ddp_probe.py: each rank writes fingerprints of the images it trained on
    probe.write_text(json.dumps({"trainer": {"callbacks": [{"class_path": "ddp_probe.ImageLog",
                                                            "init_args": {"out_dir": str(tmp_path)}}]}}))
    res = run([BIN / "cifarlab", "fit", "-c", "configs/exp1.yaml", "-c", probe, f"--data.data_dir={data_dir}",
               "--data.subset=1280", "--trainer.max_epochs=1", "--trainer.strategy=ddp", "--trainer.devices=2",
               "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", *QUIET],
              env=env_with_venv(PYTHONPATH=str(ROOT / "tests")))
    assert res.returncode == 0, res.stderr[-3000:]
    # each of the 2 ranks trains on its own half: 640 images = 10 steps of 64, not 20
    assert last_checkpoint(tmp_path)["global_step"] == 1280 // 2 // 64
    shards = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 640 and not shards[0] & shards[1]  # different halves of the subset


def test_test_and_validate_commands(tiny_ckpt, data_dir, tmp_path, capsys):
    """`cifarlab test` and `cifarlab validate` on a checkpoint: Lightning's loops give the numbers our own predictions
    give. In process: the dispatcher the console script calls (the other tests here start the script itself)."""
    common = ["-c", "configs/exp1.yaml", f"--data.data_dir={data_dir}", "--data.subset=3000", "--data.val_size=1000",
              f"--ckpt_path={tiny_ckpt}", f"--trainer.default_root_dir={tmp_path}", *QUIET]  # the run's own data
    shown = lambda metric, out: float(re.search(metric + r"\W+([0-9.]+)", out).group(1))
    assert main(["test", *common]) in (0, None)
    out = capsys.readouterr().out
    probs, labels = predict_test_split(tiny_ckpt, data_dir)  # the whole test split; the run's subset is its first 3000
    assert abs(shown("test_acc", out) - (probs[:3000].argmax(1) == labels[:3000]).mean()) < 1e-4, out
    assert main(["validate", *common]) in (0, None)
    out = capsys.readouterr().out
    model, dm = load_run(tiny_ckpt, data_dir)  # its validation split: all 1000 (the run's subset of 3000 takes them all)
    with torch.no_grad(): batches = [(model.predict_step((x, y)).argmax(1), y) for x, y in dm.val_dataloader()]
    preds, labels = (torch.cat(t)[:3000] for t in zip(*batches))
    assert abs(shown("val_acc", out) - (preds == labels).float().mean().item()) < 1e-4, out
