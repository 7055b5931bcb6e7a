"""Shared fixtures: where the real CIFAR-10 archive is, and the project's environment for subprocesses."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: cifarlab, dvc, nbdev_export, ...


@pytest.fixture(scope="session")
def archive():
    "The real CIFAR-10 archive named by CIFARLAB_ARCHIVE (`.ci/run` sets it)."
    path = os.environ.get("CIFARLAB_ARCHIVE")
    if not path or not Path(path).is_file():
        pytest.skip("set CIFARLAB_ARCHIVE to the path of cifar-10-python.tar.gz to run the data tests")
    return Path(path).resolve()


def env_with_venv(**extra):
    "os.environ with the project's environment first on PATH."
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def run(cmd, cwd=ROOT, env=None, timeout=600, **kw):
    "Run `cmd` with the project's environment on PATH; capture text output."
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or env_with_venv(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def commit_all(repo, msg):
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg]):
        res = run(cmd, cwd=repo)
        assert res.returncode == 0, res.stderr


def copy_of_repo(dst):
    "A fresh git repo at `dst` holding the files this checkout would commit (like a clean clone)."
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"]).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file() or (ROOT / f).is_symlink():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f, follow_symlinks=False)
    assert run(["git", "init", "-q"], cwd=dst).returncode == 0
    commit_all(dst, "copy")
    return dst
