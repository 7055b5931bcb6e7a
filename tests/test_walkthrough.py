"""The JupyterLab user's walkthrough: every notebook (the numbered ones and the index), every cell (slow ones and the
notebooks' own tests included), in a real Jupyter kernel, in a scratch copy of the repo, with `CIFARLAB_QUICK=1`
(04_experiments' short schedule). Where a notebook has a quick mode, every plot and every table it shows says so, or
names the committed results file it shows."""
import json
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT, copy_of_repo

pytestmark = pytest.mark.slow  # left out of the quick subset (`-m "not slow"`)

# Put in front of a notebook with a quick mode: the text of every figure drawn (shown inline or saved), for the check.
RECORD_FIGURES = """\
import matplotlib.backend_bases, matplotlib.text
_figure_texts, _print_figure = [], matplotlib.backend_bases.FigureCanvasBase.print_figure
def _print_recorded(self, *args, **kwargs):
    _figure_texts.append(" ".join(t.get_text() for t in self.figure.findobj(matplotlib.text.Text)))
    return _print_figure(self, *args, **kwargs)
matplotlib.backend_bases.FigureCanvasBase.print_figure = _print_recorded"""
LABEL = "QUICK MODE"


def run_notebook(path):
    "Execute `path` in a fresh kernel; (the executed notebook, whether it has a quick mode, its figures' texts)."
    nb = nbformat.read(path, as_version=4)
    quick = any(LABEL in c.source for c in nb.cells if c.cell_type == "code")  # it labels what it shows in quick mode
    if quick:
        nb.cells.insert(0, nbformat.v4.new_code_cell(RECORD_FIGURES))
        nb.cells.append(nbformat.v4.new_code_cell("import json; print(json.dumps(_figure_texts))"))
    try:
        # the kernel is killed when done ("immediate"): a graceful exit spends 2-3 s freeing torch's modules one by one
        NotebookClient(nb, timeout=600, kernel_name="python3", shutdown_kernel="immediate",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as e:
        failed = next((i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
        cell = nb.cells[failed] if failed is not None else None
        where = f"cell {failed} (id {cell.get('id')}): {cell.source.splitlines()[0] if cell.source else ''}" if cell else "a cell"
        pytest.fail(f"{path.name}, {where}\n{str(e)[-3000:]}")
    figures = json.loads(nb.cells[-1].outputs[0]["text"]) if quick else []
    return nb, quick, figures


def tables(nb):
    "The HTML tables a notebook showed (pandas frames and stylers), one string each."
    return [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "<table" in o.get("data", {}).get("text/html", "")]


NOTEBOOKS = sorted(p.name for p in (ROOT / "nbs").glob("[0-9][0-9]*_*.ipynb")) + ["index.ipynb"]  # 04a after 04


def test_no_numbered_notebook_is_left_out():
    numbers = sorted({name[:2] for name in NOTEBOOKS[:-1]})
    assert numbers == [f"{i:02d}" for i in range(len(numbers))] and len(numbers) >= 9, numbers
    assert {"04_experiments.ipynb", "08_tune.ipynb"} <= set(NOTEBOOKS)  # the two with a quick mode, checked below
    assert set(LONGEST) <= set(NOTEBOOKS), "a notebook in LONGEST was renamed or removed"


@pytest.fixture(scope="session")
def scratch(tmp_path_factory, data_dir):
    "A copy of the repo to run the notebooks in (one per test process), with the prepared data as `cifarlab data` leaves it."
    repo = copy_of_repo(tmp_path_factory.mktemp("walkthrough"))
    (repo / "data" / "cifar10").symlink_to(data_dir)
    return repo


# The four that train or export, about a minute each in quick mode (the "walkthrough" lines of a run's summary); each of
# the others takes under half a minute.
LONGEST = ["04_experiments.ipynb", "08_tune.ipynb", "05_onnx.ipynb", "10_trust.ipynb"]


# Each notebook is a test of its own, so that the two test processes share them out; each runs in a fresh kernel.
# They are handed out in this order, the longest first: the last to start are short, so neither process is left
# waiting long at the end for the other's minute-long notebook.
@pytest.mark.parametrize("name", sorted(NOTEBOOKS, key=lambda n: LONGEST.index(n) if n in LONGEST else len(LONGEST)))
def test_notebook_runs_top_to_bottom(name, scratch, monkeypatch, record_property):
    monkeypatch.setenv("CIFARLAB_QUICK", "1")
    monkeypatch.delenv("IN_TEST", raising=False)  # a person's run, not nbdev_test's
    t0 = time.monotonic()
    nb, quick, figures = run_notebook(scratch / "nbs" / name)
    record_property(f"walkthrough {name}", f"{time.monotonic() - t0:.1f} s")  # in the summary
    assert quick == (name in ("04_experiments.ipynb", "08_tune.ipynb")), "a notebook gained or lost its quick mode"
    if not quick: return
    assert figures, f"{name} drew no figure in quick mode"
    # each one says it comes from this quick run, or names the committed results file it shows instead
    labelled = lambda text: LABEL in text or "bench/results/" in text
    unlabelled = [f"figure {t[:100]!r}" for t in figures if not labelled(t)]
    unlabelled += [f"table {t[:200]!r}" for t in tables(nb) if not labelled(t)]
    assert not unlabelled, f"{name}: quick-mode results not labelled {LABEL!r}:\n" + "\n".join(unlabelled)
