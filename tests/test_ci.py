"""The project's own checks: the console script, README's test command, and the library/notebook sync check."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's scripts: cifarlab, nbdev_export, ...


def run(cmd, cwd=ROOT, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)


def test_env_json_from_console_script():
    res = run([BIN / "cifarlab", "env", "--json", "--size", "300"], timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["packages"]["torch"]
    assert report["accelerator"]["kind"] in {"cpu", "cuda", "mps"}
    assert report["matmul"]["n"] == 300 and report["matmul"]["gflops"] > 0


def test_env_bad_device_fails_clearly():
    res = run([BIN / "cifarlab", "env", "--device", "no-such-device", "--size", "64"], timeout=120)
    assert res.returncode == 1
    assert "cannot compute on device 'no-such-device'" in res.stderr


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(uv run [^\n]*pytest[^\n]*)$", readme, flags=re.M)
    assert commands, "README.md must give the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert any(re.search(rf"^{re.escape(c.replace('uv run', 'uv run --locked'))}$", ci, flags=re.M) for c in commands), commands


def _commit_all(repo, msg):
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg]):
        assert run(cmd, cwd=repo).returncode == 0


def _copy_of_repo(tmp_path):
    "A fresh git repo holding the files this checkout would commit."
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]).stdout.split("\0")
    dst = tmp_path / "repo"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f, follow_symlinks=False)
    assert run(["git", "init", "-q"], cwd=dst).returncode == 0
    _commit_all(dst, "copy")
    return dst


def test_check_sync_catches_hand_edit(tmp_path):
    repo = _copy_of_repo(tmp_path)
    ok = run(["bash", ".ci/check-sync"], cwd=repo, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(repo / "cifarlab" / "env.py", "a") as f: f.write("\nHAND_EDIT = 1\n")
    _commit_all(repo, "a hand edit of the generated library")
    bad = run(["bash", ".ci/check-sync"], cwd=repo, timeout=300)
    assert bad.returncode == 1
    assert "out of sync" in bad.stderr and "cifarlab/env.py" in bad.stderr
