"""Loader throughput: `CIFAR10DataModule` (each split one uint8 tensor, batched crop/flip) against torchvision's
`CIFAR10` + `DataLoader` with the same augmentation as per-image transforms, in one run on one machine.

    uv run --group bench python bench/loader.py [--data-dir data/cifar10] [--repeats 3] [--out bench/results/loader.json]

Both sides serve the same 45,000 training images (val_size=5000) in shuffled batches of 512 with a reflect-padded
random crop (4 px), a horizontal flip and normalisation, as float32 tensors on the CPU. The runs alternate, so
load on a shared machine falls on both; each figure is the median over the repeats of one full epoch.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as T
from tqdm.auto import tqdm

from cifarlab.data import CIFAR10DataModule
from cifarlab.env import cpu_name


class VerifiedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 (its own per-image `__getitem__`: PIL image, then the transforms) over arrays we have
    already verified, instead of unpickling the archive's batches a second time."""
    def __init__(self, images_nchw, labels, transform):
        torchvision.datasets.VisionDataset.__init__(self, root="", transform=transform)
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # N×32×32×3, as torchvision keeps it
        self.targets = labels.tolist()


def images_per_second(batches):
    n, t0 = 0, time.perf_counter()
    for x, y in batches: n += len(y)
    return n / (time.perf_counter() - t0), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/loader.json"))
    args = ap.parse_args()

    dm = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_size=5000, augment=["crop", "flip"],
                           crop_padding=4, pad_mode="reflect")
    dm.prepare_data(); dm.setup("fit")
    x, y = dm.splits["train"]
    tf = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(dm.mean, dm.std)])
    dataset = VerifiedCIFAR10(x, y, tf)
    contenders = {"cifarlab CIFAR10DataModule": lambda: dm.train_dataloader()}
    for workers in (0, 2):
        contenders[f"torchvision CIFAR10 + DataLoader (num_workers={workers})"] = (
            lambda w=workers: DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=w))

    rates = {name: [] for name in contenders}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for name, make in contenders.items():
            rate, n = images_per_second(make())
            rates[name].append(rate)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ours = medians.pop("cifarlab CIFAR10DataModule")
    best_name, best = max(medians.items(), key=lambda kv: kv[1])
    result = {
        "benchmark": "training-loader throughput, one epoch of 45000 images, crop(4, reflect)+flip+normalise",
        "command": "uv run python bench/loader.py",
        "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "python": platform.python_version()},
        "batch_size": args.batch_size, "repeats": args.repeats, "images_per_epoch": n,
        "images_per_second": {"cifarlab CIFAR10DataModule": rates["cifarlab CIFAR10DataModule"],
                              **{k: rates[k] for k in medians}},
        "median_images_per_second": {"cifarlab CIFAR10DataModule": ours, **medians},
        "speedup_vs_best_torchvision": ours / best, "best_torchvision": best_name,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["median_images_per_second"].items(): print(f"{r:12,.0f} images/s  {name}")
    print(f"speed-up over the best torchvision loader: {ours / best:.1f}x  -> {args.out}")


if __name__ == "__main__":
    main()
