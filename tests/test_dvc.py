"""DVC end to end on a clean copy of the repo: the data stage reproduces the committed bytes, and the prepared
data goes through the default local remote and through a real S3 API (moto's server on loopback) and back.
Wrong credentials and an unreachable endpoint fail with an error that names the problem."""
import csv
import io
import json
import shutil
import socket
import subprocess
import time

import pytest
import torch
import yaml

from cifarlab.data import is_prepared
from conftest import BIN, copy_of_repo, env_with_venv, free_port, run


@pytest.fixture(scope="module")
def repo(tmp_path_factory, archive):
    "A clean copy of the repo whose data stage has been reproduced from the real archive."
    repo = copy_of_repo(tmp_path_factory.mktemp("dvc") / "repo")
    committed = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["data"]["outs"]
    res = run(["dvc", "repro", "data"], cwd=repo, env=env_with_venv(CIFARLAB_ARCHIVE=str(archive)))
    assert res.returncode == 0, res.stdout + res.stderr
    # the same content hash as the committed dvc.lock: preparation is deterministic
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["data"]["outs"] == committed
    return repo


def dvc(repo, *args, timeout=300):
    return run(["dvc", *args], cwd=repo, timeout=timeout)


def wipe(repo):
    "Forget the data locally: DVC's cache and the workspace copy."
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(repo / "data" / "cifar10")
    assert not is_prepared(repo / "data" / "cifar10")


def roundtrip(repo, *remote):
    "Push the data stage's output, forget it locally, pull it back, verify it."
    push = dvc(repo, "push", "data", *remote)  # this copy has trained no model: only the data is cached
    assert push.returncode == 0, push.stdout + push.stderr
    wipe(repo)
    pull = dvc(repo, "pull", "data", *remote)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert is_prepared(repo / "data" / "cifar10")  # every fingerprint checked again after the trip
    status = dvc(repo, "status", "data")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout


def test_default_local_remote(repo):
    roundtrip(repo)
    assert any((repo / "dvc-storage").rglob("*")), "the default remote is the repo's dvc-storage/ folder"


def test_readme_pull_on_a_fresh_clone(repo):
    "README's `dvc pull --allow-missing`: whatever the remote holds (here the data alone) comes back, with exit status 0."
    push = dvc(repo, "push", "data")
    assert push.returncode == 0 and "WARNING" not in push.stdout + push.stderr, push.stdout + push.stderr
    wipe(repo)
    pull = dvc(repo, "pull", "--allow-missing")
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert is_prepared(repo / "data" / "cifar10")
    status = dvc(repo, "status")
    assert status.returncode == 0 and "data" not in status.stdout.split("train:")[0], status.stdout


def test_readme_pull_on_a_fresh_clone_before_anything_was_pushed(repo, tmp_path):
    "The same command on a clone whose remote is empty (nothing pushed yet): exit status 0, nothing pulled, DVC says so."
    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", repo, clone]).returncode == 0
    assert not (clone / "dvc-storage").exists()  # the default remote: a folder of this clone, not made yet
    pull = dvc(clone, "pull", "--allow-missing")
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert not (clone / "data" / "cifar10").exists()
    status = dvc(clone, "status", "data")
    assert status.returncode == 0 and "not in cache:       data/cifar10" in status.stdout, status.stdout


@pytest.fixture(scope="module")
def s3_server():
    "moto's S3 server on a free loopback port, stopped after the module."
    def start(**env):
        port = free_port()
        proc = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)], env=env_with_venv(**env),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); break
            except OSError: time.sleep(0.1)
        procs.append(proc)
        return f"http://127.0.0.1:{port}"
    procs = []
    yield start
    for p in procs: p.terminate(); p.wait(10)


def add_s3_remote(repo, name, endpoint, key="testing", secret="testing"):
    for args in (["remote", "add", "-f", name, f"s3://cifarlab-data/{name}"],
                 ["remote", "modify", name, "endpointurl", endpoint],
                 # credentials go to .dvc/config.local, which git ignores
                 ["remote", "modify", "--local", name, "access_key_id", key],
                 ["remote", "modify", "--local", name, "secret_access_key", secret]):
        res = dvc(repo, *args)
        assert res.returncode == 0, res.stderr


def test_s3_roundtrip(repo, s3_server):
    import boto3
    endpoint = s3_server()
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="cifarlab-data")
    add_s3_remote(repo, "s3", endpoint, secret="not-in-git-123")
    assert "not-in-git-123" not in (repo / ".dvc" / "config").read_text()
    assert run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo).returncode == 0
    roundtrip(repo, "-r", "s3")


def test_s3_wrong_credentials(repo, s3_server):
    endpoint = s3_server(INITIAL_NO_AUTH_ACTION_COUNT="0")  # this server checks credentials
    add_s3_remote(repo, "s3auth", endpoint, key="AKIAWRONG", secret="wrong")
    res = dvc(repo, "push", "data", "-r", "s3auth", timeout=120)
    assert res.returncode != 0
    assert "Forbidden: An error occurred (403)" in res.stderr, res.stderr  # as README.md says


def test_s3_unreachable_endpoint(repo):
    add_s3_remote(repo, "s3down", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    res = dvc(repo, "push", "data", "-r", "s3down", timeout=120)
    assert res.returncode != 0
    assert "Could not connect to the endpoint URL" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 90


@pytest.mark.slow
def test_pipeline_experiment_runs_the_recipe_it_names(repo, browser, tmp_path):
    "`dvc exp run -S train.config=configs/exp1.yaml` trains exp1 as the recipe file says; `-S file:key` changes one key."
    # the `evaluate` target runs data -> train -> evaluate; export and verify have tests of their own
    res = dvc(repo, "exp", "run", "evaluate", "-S", "train.config=configs/exp1.yaml", "-S", "train.subset=640",
              "-S", "configs/exp1.yaml:trainer.max_epochs=1", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "test accuracy:" in res.stdout
    assert "epoch 1/1" in res.stdout  # the per-epoch progress line, in the pipeline's log
    # what was trained is configs/exp1.yaml, with the one key -S changed
    ckpt = torch.load(repo / "runs" / "pipeline" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp, data = ckpt["hyper_parameters"], ckpt["datamodule_hyper_parameters"]
    assert hp["net"]["class_path"] == "cifarlab.model.SimpleCnn" and hp["optimizer"] == "adam" and hp["lr"] == 0.001
    assert data["batch_size"] == 64 and data["subset"] == 640 and data["normalize"] == "half" and ckpt["epoch"] == 0
    assert ckpt["global_step"] == 640 // 64  # one epoch of the 640-image subset
    params = dvc(repo, "params", "diff", "--all", "--json")
    assert params.returncode == 0, params.stderr
    diff = json.loads(params.stdout)
    assert diff["params.yaml"]["train.config"]["new"] == "configs/exp1.yaml"
    assert diff["configs/exp1.yaml"]["model.lr"]["new"] == 0.001  # the recipe's own values are tracked
    metrics = dvc(repo, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    shown = json.loads(metrics.stdout)[""]["data"]
    assert 0 <= shown["dvclive/evaluate/metrics.json"]["data"]["test"]["acc"] <= 1
    assert 0 <= shown["dvclive/train/metrics.json"]["data"]["val"]["acc"] <= 1
    shown = dvc(repo, "exp", "show", "--no-pager", "--csv")
    assert shown.returncode == 0, shown.stderr
    workspace = next(r for r in csv.DictReader(io.StringIO(shown.stdout)) if r["rev"] == "workspace")
    lr = next(v for k, v in workspace.items() if k.endswith("model.lr") and v)  # "configs/exp1.yaml:model.lr" when ambiguous
    assert workspace["train.config"] == "configs/exp1.yaml" and float(lr) == 0.001, workspace

    # `dvc plots show` draws every plot with no network: the page carries its own Vega (.dvc/plots/offline.html)
    out = tmp_path / "plots"
    plots = dvc(repo, "plots", "show", "-o", str(out))
    assert plots.returncode == 0, plots.stderr[-2000:]
    page = browser.new_page()
    outside = []
    def only_local(route):
        url = route.request.url
        if url.startswith(("file://", "data:", "blob:", "http://127.0.0.1", "http://localhost")): route.continue_()
        else: outside.append(url); route.abort()
    page.route("**/*", only_local)
    page.goto((out / "index.html").as_uri())
    drawn_js = "Array.from(document.querySelectorAll('svg.marks, canvas.marks')).filter(e => e.getBoundingClientRect().width > 100).length"
    page.wait_for_function(f"{drawn_js} >= 3", timeout=30_000)
    drawn = page.evaluate(drawn_js)
    assert drawn >= 3, drawn  # the learning curves, the confusion matrix and the per-class accuracy (at least)
    assert outside == [], outside
    page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
    page.close()
