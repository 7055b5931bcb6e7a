"""Choose a recipe's test-time augmentation on the validation split: every view set of `cifarlab.model.TTA` on every
image, then the view sets given with `--views` on only the images the plain view is unsure of, at each `--margins`
value; validation accuracy, seconds, and network passes an image, from one trained checkpoint, into JSON.

    uv run cifarlab train -c configs/airbench94.yaml --data.val_size=5000 --seed_everything=0 --trainer.default_root_dir=runs/airbench94-val
    uv run python bench/tta_choice.py runs/airbench94-val/checkpoints/last.ckpt --out bench/results/tta_airbench94_val.json

The checkpoint must hold out a validation split (`--data.val_size`); the test split is never read. The model runs at
the precision its recipe trains and tests with on this machine (bf16 autocast where the CPU has native bfloat16).
The settings are changed on the rebuilt model only: the checkpoint is not written.
"""
import argparse
import contextlib
import sys
import time
import typing
from pathlib import Path

import torch

from cifarlab.core import CifarlabError
from cifarlab.env import cpu_flags, cpu_name, training_precision
from cifarlab.evaluate import load_run, predict_logits
from cifarlab.experiments import write_results
from cifarlab.model import TTA, top2_gap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--views", nargs="+", default=["flip+shift", "flip+diagonals"], choices=[t for t in typing.get_args(TTA) if t != "none"])
    ap.add_argument("--margins", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try: model, dm = load_run(args.checkpoint)
    except CifarlabError as e: ap.error(str(e))
    n_val = len(dm.splits["val"][1])
    if not n_val: ap.error(f"{args.checkpoint} held out no validation images: train with --data.val_size=5000")
    precision = training_precision()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    hp, rows = model.hparams, []
    trained_with = {"tta": hp.tta, "tta_margin": hp.tta_margin}
    hp.tta, hp.tta_margin = "none", None
    with autocast: plain = torch.from_numpy(predict_logits(model, dm, split="val")[0])
    gap = top2_gap(plain)  # what tta_logits compares with `tta_margin`, here to report the unsure share
    passed = []  # images through the network in each call: passes an image are counted, not assumed
    model.net.register_forward_hook(lambda module, inputs, output: passed.append(len(inputs[0])))
    settings = [(t, None) for t in typing.get_args(TTA)] + [(t, m) for t in args.views for m in args.margins]
    for tta, margin in settings:
        hp.tta, hp.tta_margin = tta, margin
        passed.clear(); t0 = time.perf_counter()
        with autocast: logits, labels = predict_logits(model, dm, split="val")
        seconds = time.perf_counter() - t0
        unsure = 1.0 if margin is None or tta == "none" else int((gap < margin).sum()) / n_val
        passes = sum(passed) / n_val
        rows.append({"tta": tta, "tta_margin": margin, "val_acc": float((logits.argmax(1) == labels).mean()),
                     "unsure_share": unsure, "passes_per_image": passes, "seconds": seconds})
        print(f"{tta:15s} margin {str(margin):5s} val {rows[-1]['val_acc']:.2%}  unsure {unsure:.0%}  "
              f"{passes:.2f} passes an image  {seconds:.1f} s")
    write_results({
        "benchmark": "test-time augmentation on the validation split", "checkpoint_trained_with": trained_with,
        "command": "uv run python bench/tta_choice.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "validation_images": n_val, "precision": precision,
        "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_flags": sorted({"avx512_bf16", "amx_bf16", "avx512f", "avx2"} & cpu_flags())},
        "results": rows}, args.out)


if __name__ == "__main__":
    main()
