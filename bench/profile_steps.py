"""Where a recipe's training time goes: PyTorch's profiler over some training steps, operators ranked by self time,
and the steps against the machine's roofline.

    uv run python bench/profile_steps.py configs/quick.yaml --out bench/results/profile-quick-bf16.json
    uv run python bench/profile_steps.py configs/quick.yaml --set=--trainer.precision=32-true --out bench/results/profile-quick-fp32.json

The steps run through the recipe's own objects (network, optimiser, data module with its augmentation, the
trainer's precision), after a few unprofiled warm-up steps; the JSON lists the top operators by self time on the
CPU (and on the GPU when there is one), grouped into data, forward/backward compute and optimiser time, and all
operators' self time summed by kind (convolution, matrix product, normalisation, activation, pooling, ...).

The roofline: the machine's own float32 and bfloat16 throughput on a 2048x2048 matrix product and on a 3x3
convolution (96 -> 96 channels, 16x16, batch 256, channels-last), measured here on the threads torch uses (bfloat16
only where the CPU has it natively or the recipe trains in it: elsewhere it is emulated, minutes slow, and no
reference for a float32 recipe, so it is recorded as null with the reason); and the
recipe's floating-point operations per training step (PyTorch's FLOP counter over one step, forward and backward),
so that achieved FLOP/s (those operations over the median unprofiled seconds per step of a few timed blocks) can
be read as a fraction of what the same cores do on a plain convolution (model FLOPs utilisation).

Like the `cifarlab` command's training, the process keeps the memory it frees for reuse (`keep_freed_memory`, 07_cli);
`CIFARLAB_KEEP_FREED_MEMORY=0` profiles with the C library's defaults, and the machine's entry records which.
The profiler itself disturbs that reuse: while it records, the process faults in fresh pages again (tens of thousands
a step for airbench94, against a few thousand unprofiled), and the operator that first writes a new buffer (`fill_`,
`zero_`, in max-pooling's backward) takes the kernel's time. The JSON gives the minor page faults a step, unprofiled
and profiled, so a reader can tell when the operator ranking carries cost that training, which reuses its memory,
does not pay.
"""
import argparse
import itertools
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.cli import KEEP_MEMORY_VAR, keep_freed_memory
from cifarlab.env import cpu_flags, cpu_has_native_bf16, cpu_name, synchronize
from cifarlab.experiments import recipe_objects, write_results


# an operator's kind, from its name (first match wins); what matches none is "other"
KINDS = [("convolution", r"conv"), ("matrix product", r"addmm|\bmm\b|matmul|linear|bmm"),
         ("normalisation", r"batch_norm|layer_norm|group_norm"), ("activation", r"gelu|relu|silu|sigmoid|tanh"),
         ("pooling", r"pool"), ("loss", r"cross_entropy|nll_loss|log_softmax"),
         ("copy and layout", r"copy_|to_copy|contiguous|clone|empty|cat|stack|pad|flip|slice|index|select|view|reshape|permute|transpose|as_strided"),
         ("elementwise", r"add|mul|sub|div|where|fill|zero|lerp|sqrt|addcmul|addcdiv|neg|exp|sum|mean")]


def kind_of(op):
    return next((k for k, pattern in KINDS if re.search(pattern, op)), "other")


def timed(fn, repeats=5, min_s=0.3):
    "Median seconds of one call of `fn` (each repeat runs it enough times to last `min_s`), after a warm-up call."
    fn(); n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < min_s / 4: fn(); n += 1
    n = max(1, int(n * 4 * min_s / max(time.perf_counter() - t0, 1e-9) / 4))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def minor_faults():
    "Minor page faults of this process so far: each maps a fresh page, which the kernel zeroes first."
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def machine_peaks(bf16=True):
    "TFLOP/s of this machine's cores on a matrix product and a convolution, float32 and (if `bf16`) bfloat16 autocast."
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(256, 96, 16, 16).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(96, 96, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    conv_flop = 2 * 256 * 96 * 96 * 9 * 16 * 16
    peaks = {}
    with torch.no_grad():
        peaks["matmul_fp32"] = 2 * 2048**3 / timed(lambda: a @ b) / 1e12
        peaks["conv3x3_fp32"] = conv_flop / timed(lambda: conv(x)) / 1e12
        if not bf16: return peaks | {"matmul_bf16": None, "conv3x3_bf16": None}
        ab, bb = a.bfloat16(), b.bfloat16()
        peaks["matmul_bf16"] = 2 * 2048**3 / timed(lambda: ab @ bb) / 1e12
        with torch.autocast("cpu", dtype=torch.bfloat16):
            peaks["conv3x3_bf16"] = conv_flop / timed(lambda: conv(x)) / 1e12
    return peaks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=30, help="profiled training steps (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="unprofiled steps first (default 5)")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks of --steps unprofiled steps; the median counts (default 3)")
    ap.add_argument("--top", type=int, default=15, help="operators to list (default 15)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="--KEY=VALUE",
                    help="a LightningCLI override, e.g. --set=--trainer.precision=32-true (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not Path(args.config).is_file(): ap.error(f"no recipe at {args.config}")
    keeps_freed_memory = keep_freed_memory()  # as the `cifarlab` command's training does, so these are its steps

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
    with FlopCounterMode(display=False) as counter: step()
    flop_per_step = counter.get_total_flops()
    # the median of a few timed blocks: on a shared machine one block can land in a slow spell
    blocks, faults = [], minor_faults()
    for _ in range(args.blocks):
        synchronize(); t0 = time.perf_counter()
        for _ in range(args.steps): step()
        synchronize(); blocks.append((time.perf_counter() - t0) / args.steps)
    unprofiled = statistics.median(blocks)
    faults_unprofiled = (minor_faults() - faults) / (args.blocks * args.steps)
    low_precision = "16" in str(trainer.precision)  # bf16-mixed, bf16-true, 16-mixed: the bfloat16 peak is the reference
    measure_bf16 = low_precision or cpu_has_native_bf16()
    peaks = machine_peaks(bf16=measure_bf16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    synchronize(); t0, faults = time.perf_counter(), minor_faults()
    with profile(activities=activities) as prof:
        for _ in range(args.steps): step()
        synchronize()
    elapsed = time.perf_counter() - t0
    faults_profiled = (minor_faults() - faults) / args.steps
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in
              ("data (batch, augment, normalise)", "forward + loss", "backward", "optimiser")}
    ops = sorted((e for e in events if not e.key.startswith(("data (", "forward +", "backward", "optimiser"))),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    by_kind = {}
    for e in events:
        if e.key in phases or e.key.startswith("ProfilerStep"): continue
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    reference = peaks["conv3x3_bf16" if low_precision else "conv3x3_fp32"]
    achieved = flop_per_step / unprofiled / 1e12
    setting = f"{KEEP_MEMORY_VAR}=0 " if os.environ.get(KEEP_MEMORY_VAR) == "0" else ""  # part of the command when given
    result = {"benchmark": "training-step profile",
              "command": setting + "uv run python bench/profile_steps.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "precision": str(trainer.precision),
              "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          # what decides the CPU's bfloat16 speed: native AVX-512 BF16 and AMX, or neither
                          "matrix_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                                "amx_tile", "amx_bf16", "amx_int8"}),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          "keeps_freed_memory": keeps_freed_memory},
              "steps": args.steps, "batch_size": dm.hparams.batch_size,
              "seconds_per_step": elapsed / args.steps, "images_per_s": args.steps * dm.hparams.batch_size / elapsed,
              "phase_seconds": phases,
              "minor_page_faults_per_step": {"unprofiled": faults_unprofiled, "profiled": faults_profiled},
              "top_ops_by_self_cpu": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                                       "share": e.self_cpu_time_total / 1e6 / elapsed} for e in ops],
              "self_seconds_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
              "roofline": {"peak_tflops": peaks,
                           **({} if measure_bf16 else {"bf16_peaks_skipped": "no native bfloat16 on this CPU (emulated "
                                                       "there) and the recipe trains in float32"}),
                           "flop_per_step": flop_per_step,
                           "seconds_per_step_unprofiled": unprofiled, "seconds_per_step_unprofiled_blocks": blocks,
                           "achieved_tflops": achieved,
                           "reference": "conv3x3_bf16" if low_precision else "conv3x3_fp32",
                           "fraction_of_reference": achieved / reference}}
    write_results(result, args.out)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"{elapsed / args.steps * 1000:.0f} ms per step, phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    print(f"minor page faults a step: {faults_unprofiled:,.0f} unprofiled, {faults_profiled:,.0f} profiled")
    print(f"roofline: {flop_per_step / 1e9:.1f} GFLOP a step in {unprofiled * 1000:.0f} ms: {achieved:.3f} TFLOP/s, "
          f"{100 * achieved / reference:.1f}% of the machine's {result['roofline']['reference']} "
          f"({reference:.2f} TFLOP/s); peaks " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items() if v is not None))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
