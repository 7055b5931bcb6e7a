"""Every tracked Python file passes pyflakes' checks, through ruff: no undefined names (which fail only when their
line runs, for a benchmark script after all its work), no unused imports, no f-strings without placeholders."""
from conftest import BIN, run


def test_pyflakes_checks_pass():
    files = run(["git", "ls-files", "*.py"]).stdout.split()
    assert any(f.startswith("cifarlab/") for f in files) and any(f.startswith("bench/") for f in files), files
    res = run([BIN / "ruff", "check", "--no-cache", "--isolated", "--select", "F", "--output-format", "concise", *files])
    assert res.returncode == 0, res.stdout + res.stderr
