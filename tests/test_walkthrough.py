"""The JupyterLab user's walkthrough: every numbered notebook, in order, every cell (slow ones included), in a real
Jupyter kernel, in a scratch copy of the repo, with `CIFARLAB_QUICK=1` (04_experiments' short schedule).
`nbdev_test` (tests/test_notebooks.py) still runs the notebooks' tests; this checks what a person's run meets."""
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import copy_of_repo


def test_every_numbered_notebook_runs_top_to_bottom(tmp_path, data_dir, monkeypatch, record_property):
    repo = copy_of_repo(tmp_path / "repo")
    (repo / "data" / "cifar10").symlink_to(data_dir)  # the prepared data, as a user who ran `cifarlab data` has it
    monkeypatch.setenv("CIFARLAB_QUICK", "1")
    monkeypatch.delenv("IN_TEST", raising=False)  # a person's run, not nbdev_test's
    notebooks = sorted((repo / "nbs").glob("[0-9][0-9]*_*.ipynb"))  # 04a_evaluate sorts after 04_experiments
    numbers = sorted({p.name[:2] for p in notebooks})
    assert numbers == [f"{i:02d}" for i in range(len(numbers))] and len(numbers) >= 9, numbers  # none left out
    times = {}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        t0 = time.monotonic()
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        except CellExecutionError as e:
            failed = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
            cell = nb.cells[failed] if failed is not None else None
            where = f"cell {failed} (id {cell.get('id')}): {cell.source.splitlines()[0] if cell.source else ''}" if cell else "a cell"
            pytest.fail(f"{path.name}, {where}\n{str(e)[-3000:]}")
        times[path.name] = round(time.monotonic() - t0, 1)
    record_property("walkthrough seconds per notebook", f"{times}, total {sum(times.values()):.1f}")  # in the summary
