"""The project's own checks: the console script, README's test command, and the library/notebook sync check."""
import json
import os
import re

import pytest

from conftest import BIN, ROOT, commit_all, copy_of_repo, missing, run


def test_env_json_from_console_script():
    res = run([BIN / "cifarlab", "env", "--json", "--size", "300"], timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["packages"]["torch"]
    assert report["accelerator"]["kind"] in {"cpu", "cuda", "mps"}
    assert report["matmul"]["n"] == 300 and report["matmul"]["gflops"] > 0


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(uv run [^\n]*pytest[^\n]*)$", readme, flags=re.M)
    assert commands, "README.md must give the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(re.search(rf"^{re.escape(c.replace('uv run', 'uv run --locked'))}$", ci, flags=re.M) for c in commands), commands


def test_check_sync_catches_hand_edit(tmp_path):
    repo = copy_of_repo(tmp_path / "repo")
    ok = run(["bash", ".ci/check-sync"], cwd=repo, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(repo / "cifarlab" / "env.py", "a") as f: f.write("\nHAND_EDIT = 1\n")
    commit_all(repo, "a hand edit of the generated library")
    bad = run(["bash", ".ci/check-sync"], cwd=repo, timeout=300)
    assert bad.returncode == 1
    assert "out of sync" in bad.stderr and "cifarlab/env.py" in bad.stderr


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "on"])
def test_a_missing_part_fails_under_any_ci_value(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(BaseException) as raised: missing("podman")  # caught whatever it is: a skip here would hide the failure
    assert raised.type is pytest.fail.Exception and "CI must provide it: podman" in str(raised.value), raised


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_a_missing_part_skips_outside_ci(monkeypatch, value):
    if value is None: monkeypatch.delenv("CI", raising=False)
    else: monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception): missing("podman")


def test_ci_script_declares_itself_ci():
    "Run by hand, .ci/run still fails on a missing part rather than skipping it."
    assert re.search(r"^export CI=true$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_a_files_tests_share_one_process(request):
    """Under the suite's two processes (pytest-xdist, --dist loadgroup) a file's tests are one group, so the servers,
    images and trainings its fixtures make are made once: pytest-xdist marks a grouped test's id with its group."""
    if not os.environ.get("PYTEST_XDIST_WORKER"): pytest.skip("run without pytest-xdist (-n 0): nothing is shared out")
    assert request.node.nodeid.endswith("@test_ci"), f"{request.node.nodeid}: not grouped (see pytest's pin in pyproject.toml)"
