"""Where a recipe's training time goes: PyTorch's profiler over some training steps, operators ranked by self time.

    uv run python bench/profile_steps.py configs/quick.yaml --out bench/results/profile-quick-bf16.json
    uv run python bench/profile_steps.py configs/quick.yaml --set=--trainer.precision=32-true --out bench/results/profile-quick-fp32.json

The steps run through the recipe's own objects (network, optimiser, data module with its augmentation, the
trainer's precision), after a few unprofiled warm-up steps; the JSON lists the top operators by self time on the
CPU (and on the GPU when there is one), grouped into data, forward/backward compute and optimiser time.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from cifarlab.env import cpu_name, synchronize
from cifarlab.experiments import recipe_objects, write_results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=30, help="profiled training steps (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (default 5)")
    ap.add_argument("--top", type=int, default=15, help="operators to list (default 15)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="a LightningCLI override, e.g. --set=--trainer.precision=32-true (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not Path(args.config).is_file(): ap.error(f"no recipe at {args.config}")

    trainer, model, dm = recipe_objects(args.config, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                                        "--trainer.enable_model_summary=false", *args.overrides,
                                        # one step of fit sets up the device, precision and data module as a real run does
                                        "--trainer.max_steps=1", "--trainer.limit_val_batches=0")
    trainer.fit(model, datamodule=dm)
    model.train()
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    batches = itertools.cycle(dm.train_dataloader())
    hp = model.hparams

    def step():
        with record_function("data (batch, augment, normalise)"): x, y = next(batches)
        with record_function("forward + loss"), trainer.precision_plugin.forward_context():
            loss = F.cross_entropy(model(x), y, label_smoothing=hp.label_smoothing)
        with record_function("backward"): loss.backward()
        with record_function("optimiser"): opt.step(); opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup): step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    synchronize(); t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps): step()
        synchronize()
    elapsed = time.perf_counter() - t0
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in
              ("data (batch, augment, normalise)", "forward + loss", "backward", "optimiser")}
    ops = sorted((e for e in events if not e.key.startswith(("data (", "forward +", "backward", "optimiser"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    result = {"benchmark": "training-step profile", "command": "uv run python bench/profile_steps.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "precision": str(trainer.precision),
              "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "steps": args.steps, "batch_size": dm.hparams.batch_size,
              "seconds_per_step": elapsed / args.steps, "images_per_s": args.steps * dm.hparams.batch_size / elapsed,
              "phase_seconds": phases,
              "top_ops_by_self_cpu": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                                       "share": e.self_cpu_time_total / 1e6 / elapsed} for e in ops]}
    write_results(result, args.out)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"{elapsed / args.steps * 1000:.0f} ms per step, phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
