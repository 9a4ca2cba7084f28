"""Preprocessing and data-loading speed on a 512 x 512 x 100 phantom volume.

Measures, on whatever machine runs it (CPU only):

* end-to-end ``preprocess_dataset`` (validation included) of a one-case LiTS dataset, in slices/s;
* the floor for the same work: reading the NIfTI files and writing the same ``.npz`` bytes,
  with no computation; the ratio says how much preprocessing adds on top of I/O;
* where preprocessing time goes (validation, reading, prepare_volume/prepare_label, writing);
* ``SliceDataset`` + ``DataLoader`` samples/s at the output size with 2 workers, with and without
  augmentation, and the per-item cost of loading vs augmenting in one process.

Usage: ``python benchmarks/bench_preprocess.py [--size 320] [--slices 100] [--workers 2]``.
Files go to a temporary folder (page cache warm for every stage, so reading is not disk-bound).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from unet3plus.config import DataConfig
from unet3plus.data.dataset import SliceDataset, augment_pair, load_preprocessed, load_sample
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import prepare_label, prepare_volume, preprocess_dataset
from unet3plus.data.sources import discover_cases, organ_mask, read_volume
from unet3plus.data.validation import validate_dataset


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool and DataLoader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(function, *args, **kwargs):
    """``(result, wall seconds, cpu seconds)``: on a shared machine CPU time is the steadier number."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def load_epochs(dataset: SliceDataset, workers: int, epochs: int, batch_size: int = 16) -> None:
    """``epochs`` full shuffled passes, worker start-up included (as in training)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for _ in loader:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=320, help="output sample size")
    parser.add_argument("--volume", type=int, default=512, help="in-plane voxels of the phantom")
    parser.add_argument("--slices", type=int, default=100, help="slices of the phantom")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=int, default=3, help="DataLoader passes per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = DataConfig(size=args.size, workers=2)

    rows = []  # (label, samples, wall, cpu)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        root = Path(tmp)
        raw, out = root / "raw", root / "out"
        write_dataset("lits", raw, cases=1, seed=0, size=args.volume, slices=args.slices)
        (case,) = discover_cases("lits", raw)

        _, wall, cpu = timed(preprocess_dataset, "lits", raw, out, config)
        manifest, _ = load_preprocessed(out)
        slices = len(manifest)
        rows.append(("preprocess_dataset end to end (validation included)", slices, wall, cpu))

        # floor: read the NIfTI files into memory (np.array: uncompressed files are memory-mapped),
        # write the same npz bytes; no computation
        payloads = [(out / path).read_bytes() for path in manifest.path]
        floor_dir = root / "floor"
        floor_dir.mkdir()
        read = timed(lambda: [np.array(read_volume(path).dataobj) for path in (case.image, case.label)])
        write = timed(lambda: [(floor_dir / f"{i:04d}.npz").write_bytes(b) for i, b in enumerate(payloads)])
        rows.append(("floor: read NIfTI + write the same npz bytes", slices, read[1] + write[1], read[2] + write[2]))

        # where the time goes
        rows.append(("- validate_dataset (sources/validation.py; reads both files)", slices,
                     *timed(validate_dataset, "lits", raw, workers=config.workers)[1:]))
        image, label = read_volume(case.image), read_volume(case.label)
        rows.append(("- read image + label", slices, read[1], read[2]))
        volume = np.asanyarray(image.dataobj)
        rows.append(("- prepare_volume", slices, *timed(prepare_volume, volume, image.affine, config)[1:]))
        organ, *organ_time = timed(organ_mask, np.asanyarray(label.dataobj), "lits")
        rows.append(("- organ_mask (sources.py)", slices, *organ_time))
        rows.append(("- prepare_label", slices, *timed(prepare_label, organ, image.affine, config)[1:]))
        rows.append(("- write the npz bytes", slices, write[1], write[2]))

        split = manifest.split.iloc[0]
        plain, augmented = SliceDataset(out, split), SliceDataset(out, split, augment=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as inside a DataLoader worker
        rows.append(("load_sample, 1 thread", slices, *timed(lambda: [load_sample(path) for path in plain.paths])[1:]))
        image_t, mask_t = load_sample(plain.paths[0])
        rng = np.random.default_rng(0)
        augment_every = [(image_t, mask_t)] * slices
        rows.append(("augment_pair, 1 thread", slices, *timed(lambda: [augment_pair(*p, rng) for p in augment_every])[1:]))
        torch.set_num_threads(threads)
        for name, dataset in (("no augmentation", plain), ("augmentation", augmented)):
            wall, cpu = timed(load_epochs, dataset, args.workers, args.epochs)[1:]
            rows.append((f"DataLoader, {args.workers} workers, batch 16, {name}", args.epochs * slices, wall, cpu))

    sample_kb = sum(len(b) for b in payloads) / slices / 1024
    load = os.getloadavg()[0]
    print(f"device: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, torch {torch.__version__}")
    print(f"phantom {args.volume}x{args.volume}x{args.slices} -> {slices} samples of {args.size}x{args.size} "
          f"({sample_kb:.0f} KiB each, uncompressed npz)")
    print("| measurement | wall s | CPU s | per second (wall) | CPU ms per sample |")
    print("|---|---|---|---|---|")
    for label, count, wall, cpu in rows:
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {count / wall:.0f} | {1000 * cpu / count:.1f} |")
    end_to_end, floor = rows[0], rows[1]
    print(f"ratio end to end / floor: {end_to_end[2] / floor[2]:.1f}x wall, {end_to_end[3] / floor[3]:.1f}x CPU")


if __name__ == "__main__":
    main()
