"""Shared fixtures: where the real CIFAR-10 archive is, and the project's environment for subprocesses."""
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts: cifarlab, dvc, nbdev_export, ...


def under_ci():
    "Whether this run is CI's: `CI` set to anything but empty, 0, false or no (CI services set true or 1)."
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason):
    "The one rule for a missing part (data, browser, podman, PostgreSQL, uv, a kernel feature): skip on a developer's machine, fail under CI."
    if under_ci(): pytest.fail(f"CI must provide it: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def archive():
    "The real CIFAR-10 archive named by CIFARLAB_ARCHIVE (`.ci/run` sets it)."
    path = os.environ.get("CIFARLAB_ARCHIVE")
    if not path or not Path(path).is_file():
        missing(f"set CIFARLAB_ARCHIVE to the path of cifar-10-python.tar.gz to run the data tests (it is {path!r})")
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


def pytest_configure(config):
    # Two test processes on two cores: each trains on one thread (and so do the processes it starts), so that
    # neither spins on threads of its own that the other one's work has taken the core from.
    if os.environ.get("PYTEST_XDIST_WORKER"): os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    # --dist loadgroup: a file's tests run in one process, with the servers and builds its fixtures make once, except
    # the walkthrough's notebooks, independent of each other, which the two processes share out one by one
    for item in items:
        if item.path.name != "test_walkthrough.py": item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_terminal_summary(terminalreporter):
    # Figures a test records with record_property (the walkthrough's times, the image's size) end the report.
    for report in terminalreporter.stats.get("passed", []):
        for key, value in report.user_properties: terminalreporter.write_line(f"{key}: {value}")


def free_port():
    "A TCP port on loopback that nothing listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(tmp_path_factory, name, make):
    """The folder `name`, made by `make(folder)` once for the whole run: the suite runs in two processes
    (pytest-xdist), and whichever asks first builds it while the other waits on the lock, then both use it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"): root = root.parent  # the folder the workers share
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    "The prepared CIFAR-10 in data/cifar10, prepared from $CIFARLAB_ARCHIVE first when it is missing."
    d = ROOT / "data" / "cifar10"
    def prepare(_):
        if (d / "meta.json").is_file(): return
        if not os.environ.get("CIFARLAB_ARCHIVE"):
            missing("no prepared data/cifar10: set CIFARLAB_ARCHIVE (or run `cifarlab data`) to run the model tests")
        res = run([BIN / "cifarlab", "data", "--quiet", "--data_dir", d])
        assert res.returncode == 0, res.stderr
    once(tmp_path_factory, "data-prepared", prepare)
    return d


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_dir):
    """A SimpleCnn (configs/exp1.yaml) trained for one epoch on 3000 images, once a run: about 20 s on two CPU cores.
    It holds out 1,000 validation images, not the recipe's 5,000: what is fitted or chosen on them (the export's
    temperature and threshold, bench/tta_choice.py's rows) is computed the same way on a fifth of the work."""
    def train(root):
        res = run([BIN / "cifarlab", "fit", "-c", "configs/exp1.yaml", f"--data.data_dir={data_dir}", "--data.subset=3000",
                   "--data.val_size=1000",
                   "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false"], timeout=900)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return once(tmp_path_factory, "tiny-run", train) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory, tiny_ckpt, data_dir):
    "`cifarlab export` of `tiny_ckpt` (test accuracy on the full test set), once a run: (the model's path, what it printed)."
    def export(folder):
        (folder / "model").mkdir()  # a folder of its own: the test of the export sees what else it wrote there
        res = run([BIN / "cifarlab", "export", tiny_ckpt, "--output", folder / "model" / "model.onnx", "--data_dir", data_dir],
                  timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        (folder / "stdout.txt").write_text(res.stdout)
    folder = once(tmp_path_factory, "export", export)
    return folder / "model" / "model.onnx", (folder / "stdout.txt").read_text()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser download is never used
# headless as root, and no background connections (this machine's network is closed)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists(): missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def png(array_or_image, fmt="PNG", **kw):
    "An image (a uint8 H×W×C array or a Pillow image) encoded as `fmt` (PNG by default)."
    from PIL import Image
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def right_image(exported_model, data_dir):
    "A real CIFAR-10 test image (as PNG) the model classifies correctly and confidently, and its class."
    import numpy as np
    import onnxruntime as ort
    from cifarlab.data import CLASSES, load_split
    images, labels = load_split(data_dir, "test")
    sess = ort.InferenceSession(str(exported_model[0]), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": images[:500]})[0]
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    right = np.flatnonzero(p.argmax(1) == labels[:500])
    i = right[p[right].max(1).argmax()]
    return png(images[i].transpose(1, 2, 0)), CLASSES[labels[i]]
