"""README.md's measured figures: its Results tables are what bench/tables.py makes of the benchmarks' JSON files and
the pipeline's verify report, a changed figure in one of those makes `--check` fail, and the prose outside the
generated block types no measured figure of its own."""
import json
import re
import shutil
import sys

from conftest import ROOT, run

sys.path.insert(0, str(ROOT / "bench"))
from tables import recipe_epochs  # noqa: E402  (bench/ is scripts, not a package)

TABLES = ROOT / "bench" / "tables.py"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def tables(*args):
    return run([sys.executable, TABLES, *args], timeout=60)


def test_readme_tables_are_current():
    res = tables("--check")
    assert res.returncode == 0, res.stderr


def scratch(tmp_path):
    "Copies of README.md, bench/results and reports/verify.json, and the options that point bench/tables.py at them."
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "results")
    (tmp_path / "reports").mkdir()
    shutil.copy(ROOT / "reports" / "verify.json", tmp_path / "reports")
    return ["--readme", tmp_path / "README.md", "--results", tmp_path / "results", "--reports", tmp_path / "reports"]


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def outside_block(text): return text.split(START)[0], text.split(END)[1]


def test_changed_benchmark_figure_fails_the_check_until_rewritten(tmp_path):
    opts = scratch(tmp_path)
    assert tables("--check", *opts).returncode == 0
    results = tmp_path / "results" / "quick_vs_seed.json"
    later = json.loads(results.read_text())["summary"]["cifarlab"]["wall_s_median"] + 10
    edit_json(results, lambda d: d["summary"]["cifarlab"].update(wall_s_median=later))
    res = tables("--check", *opts)
    assert res.returncode == 1
    assert "run `uv run python bench/tables.py`" in res.stderr
    assert re.search(rf"^\+\| `cifarlab train -c configs/quick.yaml` .* {re.escape(f'{later:,.1f}')} s \|", res.stderr, flags=re.M), res.stderr
    before = (tmp_path / "README.md").read_text()
    assert tables(*opts).returncode == 0  # rewriting the block brings it in line, and touches nothing else
    after = (tmp_path / "README.md").read_text()
    assert tables("--check", *opts).returncode == 0
    assert outside_block(after) == outside_block(before) and after != before


def test_changed_pipeline_accuracy_fails_the_check(tmp_path):
    opts = scratch(tmp_path)
    edit_json(tmp_path / "reports" / "verify.json", lambda d: d.update(onnx_accuracy=d["onnx_accuracy"] - 0.01))
    res = tables("--check", *opts)
    assert res.returncode == 1 and "README.md's results differ" in res.stderr


def test_benchmark_without_a_table_is_an_error(tmp_path):
    opts = scratch(tmp_path)
    (tmp_path / "results" / "new.json").write_text(json.dumps({"benchmark": "something new", "machine": {}}))
    res = tables("--check", *opts)
    assert res.returncode == 1 and "new.json: no table for the benchmark 'something new'" in res.stderr


def test_readme_without_markers_is_an_error(tmp_path):
    opts = scratch(tmp_path)
    (tmp_path / "README.md").write_text("# cifarlab\n")
    res = tables(*opts)
    assert res.returncode == 1 and "results:start" in res.stderr


def test_measured_figures_only_in_the_results_block():
    "Timings, rates, sizes and decimal percentages outside the generated block would go stale unseen."
    prose = "".join(outside_block((ROOT / "README.md").read_text()))
    unit = r"(?:%|ms|s|min|minutes|seconds|hours|MB|GB|MiB|GiB|images/s|requests/s|GFLOP/s)"
    figures = re.findall(rf"(?<![\w.])(?:\d+\.\d+\s?%|\d[\d,.]*\s?{unit.replace('%|', '')}(?![\w/]))", prose)
    assert not figures, figures


def test_one_commands_files_for_other_seeds_are_one_row(tmp_path):
    "Files of one vs_seed command on one kind of machine, run for different seeds (`--first-seed`), make one row."
    opts = scratch(tmp_path)
    first = tmp_path / "results" / "airbench94_muon_whole_command_avx2.json"
    for other in (tmp_path / "results").glob("airbench94_muon_*.json"):  # this test's pair alone in that row
        if other != first: other.unlink()
    d = json.loads(first.read_text())
    (run0,) = d["runs"]["cifarlab"]
    later = {**run0, "seed": 5, "test_acc": run0["test_acc"] - 0.01, "wall_s": run0["wall_s"] + 100}
    d["runs"]["cifarlab"] = [later]
    d["command"] = d["command"].replace("--seeds 1", "--seeds 1 --first-seed 5").replace(first.name, "muon_seed5.json")
    (tmp_path / "results" / "muon_seed5.json").write_text(json.dumps(d))
    assert tables(*opts).returncode == 0
    text = (tmp_path / "README.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| `cifarlab train -c configs/airbench94_muon.yaml`")]
    mean = (run0["test_acc"] + later["test_acc"]) / 2
    assert len(rows) == 1 and f"| 2 (8 epochs) | {100 * mean:.2f}% " in rows[0], rows
    assert f"{run0['wall_s'] + 50:,.1f} s" in rows[0]  # the median of the two runs' wall times
    assert "gathers `airbench94_muon_whole_command_avx2.json` and `muon_seed5.json`" in text
    # the same seed twice is a mistake, not more evidence
    edit_json(tmp_path / "results" / "muon_seed5.json", lambda d: d["runs"]["cifarlab"][0].update(seed=run0["seed"]))
    res = tables("--check", *opts)
    assert res.returncode == 1 and "repeat a seed" in res.stderr


def test_a_recipe_run_with_overrides_has_a_row_of_its_own(tmp_path):
    "A vs_seed file of a recipe with `--set` overrides is not the recipe's: its row names them, beside the plain row."
    opts = scratch(tmp_path)
    plain = tmp_path / "results" / "airbench94_whole_command_avx2.json"
    # trained for the recipe's epochs of today, so that the overrides are all that tells the rows apart
    edit_json(plain, lambda d: [r.update(epochs=recipe_epochs("configs/airbench94.yaml")) for r in d["runs"]["cifarlab"]])
    d = json.loads(plain.read_text())
    d["overrides"] = ["--model.net.init_args.identity_init=every"]
    d["command"] = d["command"].replace(" --out", " --set=--model.net.init_args.identity_init=every --out").replace(plain.name, "every.json")
    (tmp_path / "results" / "every.json").write_text(json.dumps(d))
    assert tables(*opts).returncode == 0
    lines = (tmp_path / "README.md").read_text().splitlines()
    row = "| `cifarlab train -c configs/airbench94.yaml"
    labels = sorted(l.split("|")[1].strip() for l in lines if l.startswith(row) and "no native bfloat16" in l)
    assert labels == ["`cifarlab train -c configs/airbench94.yaml --model.net.init_args.identity_init=every`",
                      "`cifarlab train -c configs/airbench94.yaml`"], labels


def test_a_row_from_before_its_recipes_epochs_changed_names_the_count_it_trained(tmp_path):
    "A vs_seed file whose runs trained another number of epochs than its recipe file gives today is reproduced with that count."
    opts = scratch(tmp_path)
    now = recipe_epochs("configs/airbench94.yaml")
    edit_json(tmp_path / "results" / "airbench94_whole_command_avx2.json",
              lambda d: [r.update(epochs=now + 1) for r in d["runs"]["cifarlab"]])
    assert tables(*opts).returncode == 0
    text = (tmp_path / "README.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| `cifarlab train -c configs/airbench94.yaml") and "no native bfloat16" in l]
    assert len(rows) == 1 and rows[0].startswith(f"| `cifarlab train -c configs/airbench94.yaml --trainer.max_epochs={now + 1}` | 1 ({now + 1} epochs)"), rows
    assert f"--seeds 1 --seed-runs 0 --set=--trainer.max_epochs={now + 1} --out bench/results/airbench94_whole_command_avx2.json" in text
