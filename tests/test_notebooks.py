"""Every notebook's tests, run the way `nbdev_test` runs them: cells flagged in settings.ini's `tst_flags`
(`#| slow`) are skipped, and `IN_TEST` is set so a notebook can shrink its own workload."""
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook  # aliased so pytest does not collect it as a test

CFG = get_config()
NOTEBOOKS = sorted(p for p in CFG.nbs_path.glob("*.ipynb") if not p.name.startswith("_"))


def test_notebooks_found():
    assert {"index.ipynb", "00_env.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    ok, _ = run_notebook(nb, skip_flags=CFG.tst_flags.split(), basepath=CFG.config_path)
    assert ok, f"a cell of {nb.name} failed: its traceback is in the captured stderr above"
