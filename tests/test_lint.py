"""Every tracked Python file names only what it defines or imports: pyflakes' undefined-name checks, through ruff.
Such a name fails only when its line runs, which for a benchmark script can be after all its work."""
from conftest import BIN, run

# undefined name, undefined name in __all__, local variable used before assignment
UNDEFINED = "F821,F822,F823"


def test_no_undefined_names():
    files = run(["git", "ls-files", "*.py"]).stdout.split()
    assert any(f.startswith("cifarlab/") for f in files) and any(f.startswith("bench/") for f in files), files
    res = run([BIN / "ruff", "check", "--no-cache", "--isolated", "--select", UNDEFINED, "--output-format", "concise", *files])
    assert res.returncode == 0, res.stdout + res.stderr
