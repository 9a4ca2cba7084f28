"""Resize vs spacing-aware preprocessing on phantoms whose field of view varies.

The question (issue 12): a scan with a larger field of view than the training scans (the same
anatomy with more air around it, so larger pixels) gets an empty mask when every slice is squashed
to ``data.size`` (``resize``), because the organ then appears smaller than any organ seen in
training. ``spacing`` resamples every slice to ``data.spacing_mm`` first, so the organ keeps its
size in pixels.

Both modes get the same data and the same small model, trained side by side in one run:

* training set: ``--cases`` LiTS phantoms with fields of view 1.0-1.3x the standard one;
* test A: the training set's own test split (same field-of-view distribution);
* test B: ``--held-out`` new phantoms (another seed) with fields of view 1.6-1.9x, as in the issue.

Dice is per volume, in each scan's own voxel grid (the model's prediction restored through the
geometry of its mode), thresholded at 0.5, with the CGM gate; means over volumes are printed as a
markdown table.

Usage: ``python benchmarks/bench_spacing.py [--cases 14] [--held-out 5] [--size 64] [--epochs 15]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from unet3plus.checkpoint import load_checkpoint
from unet3plus.config import Config, DataConfig, LossConfig, MlflowConfig, ModelConfig, TrainConfig
from unet3plus.data.dataset import load_preprocessed
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.data.sources import discover_cases, organ_mask, read_volume
from unet3plus.metrics import dice
from unet3plus.predict import predictor_from_checkpoint
from unet3plus.train import train


def volume_dice(checkpoint: Path, image_path: Path, label_path: Path) -> float:
    """Dice of the checkpoint's mask on one scan, in the scan's own voxel grid."""
    predictor = predictor_from_checkpoint(load_checkpoint(checkpoint), checkpoint, "cpu")
    scan, label = read_volume(image_path), read_volume(label_path)
    mask = predictor.segment(scan, image_path.name)
    return dice(mask, organ_mask(np.asanyarray(label.dataobj), "lits").astype(bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=14)
    parser.add_argument("--held-out", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="phantom voxels and sample size")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--spacing-mm", type=float, default=7.5, help="spacing mode target; size x spacing >= body")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    with tempfile.TemporaryDirectory(prefix="bench-spacing-") as tmp:
        root = Path(tmp)
        write_dataset("lits", root / "raw", cases=args.cases, seed=0, size=args.size, slices=args.slices,
                      fov_range=(1.0, 1.3))
        write_dataset("lits", root / "held_out", cases=args.held_out, seed=100, size=args.size,
                      slices=args.slices, fov_range=(1.6, 1.9))
        held_out = [case for case in discover_cases("lits", root / "held_out")]
        pixel_mm = {
            name: [float(nib.affines.voxel_sizes(nib.load(path).affine)[0]) for path in paths]
            for name, paths in (("train", sorted((root / "raw").glob("volume-*"))), ("held", [c.image for c in held_out]))
        }
        rows = []
        for mode in ("resize", "spacing"):
            data = DataConfig(size=args.size, resize_mode=mode, spacing_mm=args.spacing_mm, workers=2)
            preprocess_dataset("lits", root / "raw", root / mode, data)
            _, cases = load_preprocessed(root / mode)
            config = Config(
                data=data, model=ModelConfig(width=args.width), loss=LossConfig(),
                train=TrainConfig(epochs=args.epochs, batch_size=8, optimizer="adamw", lr=3e-3, schedule="cosine",
                                  num_workers=0, device="cpu"),
                mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", system_metrics=False),
            )  # fmt: skip
            started = time.perf_counter()
            summary = train(config, root / mode, root / f"model-{mode}")
            seconds = time.perf_counter() - started
            checkpoint = root / f"model-{mode}" / "best.pt"
            test = [(root / "raw" / e["image"], root / "raw" / e["label"]) for e in cases["cases"].values()
                    if e["split"] == "test"]  # fmt: skip
            dice_test = [volume_dice(checkpoint, image, label) for image, label in test]
            dice_held = [volume_dice(checkpoint, case.image, case.label) for case in held_out]
            rows.append((mode, summary["best_val_dice"], np.mean(dice_test), len(test), np.mean(dice_held),
                         len(held_out), dataclasses.asdict(data), seconds))  # fmt: skip

    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}")
    print(f"phantoms {args.size}x{args.size}x{args.slices}; training FOV 1.0-1.3x (pixels {min(pixel_mm['train']):.2f}-"
          f"{max(pixel_mm['train']):.2f} mm), held-out FOV 1.6-1.9x (pixels {min(pixel_mm['held']):.2f}-"
          f"{max(pixel_mm['held']):.2f} mm); UNet 3+ width {args.width}, {args.epochs} epochs, "
          f"spacing_mm {args.spacing_mm}")
    print("\n| mode | best val Dice | test Dice (same FOV) | held-out Dice (larger FOV) | train s |")
    print("|---|---|---|---|---|")
    for mode, val, test, n_test, held, n_held, _, seconds in rows:
        print(f"| {mode} | {val:.4f} | {test:.4f} ({n_test} vol) | {held:.4f} ({n_held} vol) | {seconds:.0f} |")


if __name__ == "__main__":
    main()
