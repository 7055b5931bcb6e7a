"""`cifarlab export` and `cifarlab verify` from the command line, on a small model trained here (tests/conftest.py):
export then verify pass on the full real test set; the contract is in the file; the checkpoint's normalisation is
honoured; a graph that disagrees with its checkpoint fails verify; bad inputs are one-line errors; writes are atomic.
(That the export module loads nothing of the service is 05_onnx's own test.)"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from conftest import BIN, ROOT, run
from cifarlab.contract import open_model
from cifarlab.data import CLASSES, load_meta, load_split
from cifarlab.cli import main as cifarlab


def contract_of(path):
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["cifarlab"])


def test_export_then_verify_on_full_test_set(exported_model, tiny_ckpt, data_dir, tmp_path):
    model, export = exported_model
    assert "test accuracy" in export
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]  # no temporary file left behind

    c = contract_of(model)
    assert open_model(model).contract == c  # what the service and verify read is what the export wrote
    assert c["input"] == {"name": "image", "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "height": 32,
                          "width": 32, "value_range": [0, 255], "batch": "dynamic"}
    assert c["normalisation"]["in_graph"] and c["normalisation"]["setting"] == "half"  # configs/exp1.yaml
    assert c["normalisation"]["mean"] == [0.5] * 3 and c["normalisation"]["std"] == [0.5] * 3
    assert c["classes"] == list(CLASSES) and c["test_images"] == 10_000 and 0.15 < c["test_accuracy"] < 1

    # the batch axis is dynamic: one image and 37 images both run
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images, _ = load_split(data_dir, "test")
    for n in (1, 37):
        assert sess.run(None, {"image": images[:n]})[0].shape == (n, 10)

    report = tmp_path / "verify.json"
    res = run([BIN / "cifarlab", "verify", model, "--ckpt", tiny_ckpt, "--data_dir", data_dir, "--report", report])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("verify: passed")
    r = json.loads(report.read_text())
    assert r["passed"] and r["images"] == 10_000 and all(r["checks"].values())
    assert r["max_abs_logit_diff"] <= 1e-3
    assert abs(r["onnx_accuracy"] - r["torch_accuracy"]) <= 1e-3
    assert r["onnx_accuracy"] == pytest.approx(c["test_accuracy"], abs=1e-3)


@pytest.fixture(scope="module")
def dataset_ckpt(tiny_ckpt, tmp_path_factory):
    "The tiny checkpoint, rewritten as if trained with normalize='dataset' (the test's own file: safe to load)."
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["datamodule_hyper_parameters"]["normalize"] = "dataset"
    path = tmp_path_factory.mktemp("dataset") / "dataset.ckpt"
    torch.save(ckpt, path)
    return path


def test_export_honours_dataset_normalisation(dataset_ckpt, exported_model, data_dir, tmp_path):
    out = tmp_path / "dataset.onnx"
    assert cifarlab(["export", str(dataset_ckpt), "--output", str(out), "--data_dir", str(data_dir), "--limit", "500"]) == 0
    c, meta = contract_of(out), load_meta(data_dir)
    assert c["normalisation"]["setting"] == "dataset" and c["test_images"] == 500
    assert c["normalisation"]["mean"] == meta["train_channel_mean"] and c["normalisation"]["std"] == meta["train_channel_std"]
    # same weights, other normalisation inside the graph: other logits
    images = load_split(data_dir, "test")[0][:8]
    logits = [ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
              for m in (out, exported_model[0])]
    assert np.abs(logits[0] - logits[1]).max() > 0.1
    assert cifarlab(["verify", str(out), "--ckpt", str(dataset_ckpt), "--data_dir", str(data_dir), "--limit", "500"]) == 0


def test_verify_fails_when_the_graph_disagrees(exported_model, tiny_ckpt, data_dir, tmp_path, capsys):
    # change the normalisation constants inside the graph (the two 1x3x1x1 initialisers: scale and shift)
    proto = onnx.load(str(exported_model[0]))
    tampered = 0
    for init in proto.graph.initializer:
        if list(init.dims) == [1, 3, 1, 1]:
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.2, init.name))
            tampered += 1
    assert tampered == 2
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    assert cifarlab(["verify", str(bad), "--ckpt", str(tiny_ckpt), "--data_dir", str(data_dir), "--limit", "500"]) == 1
    out = capsys.readouterr().out
    logits_line = next(line for line in out.splitlines() if "max |logit difference|" in line)
    assert "FAILED" in logits_line and out.rstrip().endswith("verify: FAILED")  # the logits line, and the verdict


def test_verify_refuses_another_checkpoint(exported_model, dataset_ckpt, data_dir):
    res = run([BIN / "cifarlab", "verify", exported_model[0], "--ckpt", dataset_ckpt, "--data_dir", data_dir])
    assert res.returncode == 1
    assert res.stderr.startswith("cifarlab verify: error:") and "was not exported from" in res.stderr


@pytest.mark.parametrize("case", ["missing checkpoint", "not a checkpoint", "no such output folder", "missing model",
                                  "not a model", "ONNX without contract"])
def test_cli_errors_are_one_line(case, tiny_ckpt, exported_model, data_dir, tmp_path, capsys):
    # in process: the dispatcher the console script calls (test_verify_refuses_another_checkpoint runs the script)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not what it claims to be" * 10)
    bare = tmp_path / "bare.onnx"  # a model ONNX Runtime runs, its metadata removed
    proto = onnx.load(str(exported_model[0]))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    cmd, args, expected = {
        "missing checkpoint": ("export", [tmp_path / "none.ckpt"], "does not exist"),
        "not a checkpoint": ("export", [junk], "is not a readable PyTorch checkpoint"),
        "no such output folder": ("export", [tiny_ckpt, "--output", tmp_path / "no" / "m.onnx"], "does not exist"),
        "missing model": ("verify", [tmp_path / "none.onnx"], "does not exist"),
        "not a model": ("verify", [junk], "is not an ONNX model ONNX Runtime can load"),
        "ONNX without contract": ("verify", [bare], "without cifarlab's contract"),
    }[case]
    assert cifarlab([cmd, *map(str, args), "--data_dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"cifarlab {cmd}: error:"), err
    assert expected in err


def test_failed_export_leaves_the_previous_file(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    assert cifarlab(["export", str(tiny_ckpt), "--output", str(out), "--data_dir", str(tmp_path / "no-data")]) == 1
    assert "cifarlab data" in capsys.readouterr().err
    assert out.read_bytes() == b"the previous model" and sorted(tmp_path.iterdir()) == [out]


@pytest.mark.slow
def test_default_recipe_exports_and_verifies(data_dir, tmp_path):
    """The recipe params.yaml gives the pipeline, as the pipeline runs it (its network, stem, TTA and the machine's
    precision), two steps, then export + verify; 1,000 validation images for the export's calibration, not 5,000."""
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["config"]
    spec = yaml.safe_load((ROOT / recipe).read_text())
    res = run([BIN / "cifarlab", "fit", "-c", recipe, f"--data.data_dir={data_dir}",
               f"--data.subset={2 * spec['data']['batch_size']}", "--data.val_size=1000", "--trainer.max_epochs=1",
               f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt, model = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "model.onnx"
    # export and verify in this process (the same commands; the fit above is the whole-process run)
    assert cifarlab(["export", str(ckpt), "--output", str(model), "--data_dir", str(data_dir), "--limit", "500"]) == 0
    c = contract_of(model)
    assert c["source"]["net"] == spec["model"]["net"]["class_path"]
    assert c["test_time_augmentation"]["tta"].startswith(spec["model"]["tta"])
    assert c["normalisation"]["setting"] == spec["data"]["normalize"]
    report = tmp_path / "verify.json"
    assert cifarlab(["verify", str(model), "--data_dir", str(data_dir), "--limit", "500", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["passed"] and r["max_abs_logit_diff"] <= 1e-4 and r["onnx_accuracy"] == r["torch_accuracy"]
    assert "recorded_accuracy" in r["checks"]  # same 500 images as at export: the recorded accuracy is checked too


def test_verify_fails_on_the_recorded_accuracy_alone(exported_model, tiny_ckpt, data_dir, tmp_path, capsys):
    "A model whose metadata claims another test accuracy than it has fails verify, though its logits are right."
    proto = onnx.load(str(exported_model[0]))
    props = {p.key: p.value for p in proto.metadata_props}
    c = json.loads(props["cifarlab"]); c["test_accuracy"] += 0.05
    onnx.helper.set_model_props(proto, {**props, "cifarlab": json.dumps(c)})
    claimed = tmp_path / "claimed.onnx"; onnx.save(proto, str(claimed))
    assert cifarlab(["verify", str(claimed), "--ckpt", str(tiny_ckpt), "--data_dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert failed[0].lstrip().startswith("recorded at export") and failed[1] == "verify: FAILED", out

