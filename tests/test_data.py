"""Acquiring and preparing CIFAR-10: the real archive is accepted, every kind of bad input is refused with a
clear error, nothing is executed, and nothing half-written is left behind."""
import contextlib
import io
import os
import pickle
import subprocess
import tarfile

import numpy as np
import pytest

from cifarlab import data
from cifarlab.cli import main as cifarlab
from conftest import BIN, env_with_venv

MEMBERS = [f"cifar-10-batches-py/{n}" for n in ("batches.meta", *data.SPLIT_BATCHES["train"], "test_batch")]


@pytest.fixture(scope="module")
def members(archive):
    "The real archive's members, as bytes."
    with tarfile.open(archive) as tar:
        return {m: tar.extractfile(m).read() for m in MEMBERS}


def repack(path, members, **replace):
    "Write a tar (uncompressed, for speed) of `members`, with batch `name=bytes` replacements."
    with tarfile.open(path, "w") as tar:
        for name, raw in members.items():
            raw = replace.get(name.rsplit("/", 1)[1], raw)
            info = tarfile.TarInfo(name); info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def cli(*args, **kw):
    "Run `cifarlab data` in-process; return (exit status, stderr text)."
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cifarlab(["data", *args, "--quiet"])
    return code, err.getvalue()


def assert_rejected(tmp_path, archive_path, *needles):
    out = tmp_path / "prepared"
    code, err = cli("--archive", str(archive_path), "--data_dir", str(out))
    assert code == 1, err
    for n in needles: assert n in err, err
    assert not out.exists(), "a rejected archive must leave nothing behind"
    assert not list(tmp_path.glob(".prepared.*")), "no temporary folder left behind"


def test_missing_archive(tmp_path):
    assert_rejected(tmp_path, tmp_path / "nope.tar.gz", "does not exist", "--archive")


def test_archive_is_a_directory(tmp_path):
    assert_rejected(tmp_path, tmp_path, "is a directory")


def test_truncated_archive(tmp_path, archive):
    cut = tmp_path / "cut.tar.gz"
    with open(archive, "rb") as f: cut.write_bytes(f.read(archive.stat().st_size // 2))
    assert_rejected(tmp_path, cut, "truncated or corrupt", "download it again")


def test_not_a_cifar_archive(tmp_path, members):
    only_meta = {k: v for k, v in members.items() if k.endswith("batches.meta")}
    assert_rejected(tmp_path, repack(tmp_path / "meta.tar", only_meta), "data_batch_1 is missing")


def test_flipped_byte_in_a_batch(tmp_path, members):
    raw = bytearray(members["cifar-10-batches-py/data_batch_3"])
    raw[len(raw) // 2] ^= 0x01  # a pixel byte in the middle of the data array
    assert_rejected(tmp_path, repack(tmp_path / "flip.tar", members, data_batch_3=bytes(raw)),
                    "data_batch_3 fails its content fingerprint")


def test_batch_swapped_for_another(tmp_path, members):
    swapped = repack(tmp_path / "swap.tar", members, data_batch_2=members["cifar-10-batches-py/data_batch_1"])
    assert_rejected(tmp_path, swapped, "data_batch_2 fails its content fingerprint", "holds the content of data_batch_1")


class RunsCode:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_pickle_that_carries_code(tmp_path, members):
    marker = tmp_path / "executed"
    evil = pickle.dumps({"data": RunsCode(marker), "labels": [0] * 10000, "batch_label": "x"}, protocol=2)
    assert_rejected(tmp_path, repack(tmp_path / "evil.tar", members, data_batch_1=evil), "refused global", "system")
    assert not marker.exists(), "the pickle's code ran"


def test_data_dir_with_other_files_is_left_alone(tmp_path, archive):
    mine = tmp_path / "mine"; mine.mkdir(); (mine / "thesis.tex").write_text("precious")
    code, err = cli("--archive", str(archive), "--data_dir", str(mine))
    assert code == 1 and "not cifarlab's prepared data" in err, err
    assert (mine / "thesis.tex").read_text() == "precious" and len(list(mine.iterdir())) == 1


def test_crash_while_writing_leaves_nothing(tmp_path, archive, monkeypatch):
    saved = []
    def crash_on_third(path, arr):
        if len(saved) == 2: raise OSError("disk full")
        saved.append(path); np.lib.format.write_array(open(path, "wb"), arr)
    monkeypatch.setattr(data.np, "save", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        data.prepare(tmp_path / "cifar10", archive, progress=False)
    assert len(saved) == 2
    assert not (tmp_path / "cifar10").exists() and not list(tmp_path.glob(".cifar10.*"))


def test_prepare_then_nothing_to_do_then_repair(tmp_path, archive):
    "The console script prepares, a second run does nothing, a damaged folder is prepared again."
    out = tmp_path / "cifar10"
    run = lambda: subprocess.run([BIN / "cifarlab", "data", "--data_dir", str(out), "--quiet"], capture_output=True,
                                 text=True, timeout=300, env=env_with_venv(CIFARLAB_ARCHIVE=str(archive)))
    first = run()
    assert first.returncode == 0 and "verified and prepared" in first.stdout, first.stderr
    assert data.is_prepared(out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == {"meta.json", "train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"}
    # the second run in-process (the console script's start-up was checked above): it only verifies
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert cifarlab(["data", "--data_dir", str(out), "--archive", str(archive), "--quiet"]) == 0
    assert "nothing to do" in said.getvalue()
    # damage one pixel: the next run notices and prepares the same bytes again
    with open(out / "test_images.npy", "r+b") as f: f.seek(5000); b = f.read(1); f.seek(5000); f.write(bytes([b[0] ^ 1]))
    assert not data.is_prepared(out)
    assert data.prepare(out, archive, progress=False) == "prepared"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
