"""Preprocessing and data-loading speed on a 512 x 512 x 100 phantom volume.

Measures, on whatever machine runs it (CPU only):

* end-to-end ``preprocess_dataset`` (reading, validation, resampling, writing) of a one-case
  LiTS dataset, in slices/s;
* the floor for the same work: reading the NIfTI files and writing the same ``.npz`` bytes, with
  no computation, reading the fastest way we know (slab by slab, as preprocessing does) and, for
  reference, nibabel's whole-volume read; the ratio says how much preprocessing adds on top of I/O;
* where preprocessing time goes (reading, checking, resampling image and mask, writing samples),
  each part alone;
* ``SliceDataset`` + ``DataLoader`` samples/s at the output size with 2 workers, with and without
  augmentation, and the per-item cost of loading vs augmenting in one process.

Every preprocessing measurement is the median of ``--repeats`` runs into a fresh folder, each
after ``os.sync()``, so that the kernel's write-back of the previous run does not land in the
next one. Files go to a temporary folder; the page cache is warm, so reading is not disk-bound.

Usage: ``python benchmarks/bench_preprocess.py [--size 320] [--slices 100] [--workers 2] [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from unet3plus.config import DataConfig
from unet3plus.data.dataset import SliceDataset, augment_pair, load_preprocessed, load_sample
from unet3plus.data.geometry import canonical_slab, chunks, volume_geometry
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import SampleWriter, preprocess_dataset, torch_threads
from unet3plus.data.sources import discover_cases, open_volume, read_slab, read_volume
from unet3plus.data.transforms import image_chunk, mask_chunk
from unet3plus.data.validation import SLAB_SLICES, CaseScan


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


def read_slabs(path: Path) -> list[np.ndarray]:
    """The whole volume, slab by slab, as preprocessing reads it."""
    image = open_volume(path)
    return [read_slab(image, path, start, start + SLAB_SLICES) for start in range(0, image.shape[2], SLAB_SLICES)]


def median_runs(repeats: int, works: list, scratch: Path) -> list[tuple[float, float]]:
    """Median wall and CPU seconds of each ``work(folder)``, over fresh folders, each after ``os.sync()``.

    The works take turns within every repeat, so that they meet the same machine (page cache,
    write-back, other jobs): their ratio is steadier than their absolute times.
    """
    samples = [([], []) for _ in works]
    for _ in range(repeats):
        for work, (walls, cpus) in zip(works, samples):
            folder = scratch / "run"
            os.sync()
            _, wall, cpu = timed(work, folder)
            walls.append(wall)
            cpus.append(cpu)
            shutil.rmtree(folder, ignore_errors=True)
    return [(statistics.median(walls), statistics.median(cpus)) for walls, cpus in samples]


def median_run(repeats: int, work, scratch: Path) -> tuple[float, float]:
    """:func:`median_runs` of one work."""
    return median_runs(repeats, [work], scratch)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=320, help="output sample size")
    parser.add_argument("--volume", type=int, default=512, help="in-plane voxels of the phantom")
    parser.add_argument("--slices", type=int, default=100, help="slices of the phantom")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=int, default=3, help="DataLoader passes per measurement")
    parser.add_argument("--repeats", type=int, default=9, help="runs per preprocessing measurement (median)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    config = DataConfig(size=args.size, workers=2)

    rows = []  # (label, samples, wall, cpu)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        root = Path(tmp)
        raw, out = root / "raw", root / "out"
        write_dataset("lits", raw, cases=1, seed=0, size=args.volume, slices=args.slices)
        (case,) = discover_cases("lits", raw)
        preprocess_dataset("lits", raw, out, config)
        manifest, _ = load_preprocessed(out)
        slices = len(manifest)
        payloads = [(out / path).read_bytes() for path in manifest.path]

        def write_payloads(folder: Path) -> None:
            folder.mkdir()
            for index, payload in enumerate(payloads):
                (folder / f"{index:04d}.npz").write_bytes(payload)

        def floor_slabs(folder: Path) -> None:
            read_slabs(case.image), read_slabs(case.label)
            write_payloads(folder)

        def floor_whole(folder: Path) -> None:
            read_volume(case.image), read_volume(case.label)
            write_payloads(folder)

        end_to_end, floor, whole = median_runs(
            args.repeats,
            [lambda folder: preprocess_dataset("lits", raw, folder, config), floor_slabs, floor_whole],
            root,
        )
        rows.append(("preprocess_dataset end to end (reading and validation included)", slices, *end_to_end))
        rows.append(("floor: read NIfTI slab by slab + write the same npz bytes", slices, *floor))
        rows.append(("floor with nibabel's whole-volume read", slices, *whole))

        # where the time goes, each part alone, with preprocessing's one torch thread
        with torch_threads(1):
            rows.append(
                (
                    "- read image + label slab by slab",
                    slices,
                    *median_run(args.repeats, lambda _: (read_slabs(case.image), read_slabs(case.label)), root),
                )
            )
            rows.append(
                (
                    "- read + check (CaseScan, as `validate` does)",
                    slices,
                    *median_run(args.repeats, lambda _: list(CaseScan(case, "lits").slabs()), root),
                )
            )
            image, label = read_volume(case.image), read_volume(case.label)
            geometry = volume_geometry(image.shape, image.affine, config.size, config.resize_mode)
            _, image_planes = canonical_slab(np.asanyarray(image.dataobj), 0, geometry)
            _, label_planes = canonical_slab(np.asanyarray(label.dataobj), 0, geometry)
            resampled = [
                (start, image_chunk(chunk, geometry, config.hu_window)) for start, chunk in chunks(image_planes)
            ]
            masks = [mask_chunk(chunk, geometry, "lits") for _, chunk in chunks(label_planes)]
            rows.append(
                (
                    "- resample the image (window, reorient, bilinear)",
                    slices,
                    *median_run(
                        args.repeats,
                        lambda _: [image_chunk(c, geometry, config.hu_window) for _, c in chunks(image_planes)],
                        root,
                    ),
                )
            )
            rows.append(
                (
                    "- resample the mask (reorient, nearest, organ)",
                    slices,
                    *median_run(
                        args.repeats, lambda _: [mask_chunk(c, geometry, "lits") for _, c in chunks(label_planes)], root
                    ),
                )
            )

            def write_samples(folder: Path) -> None:
                with SampleWriter(folder, geometry) as writer:
                    for (start, planes), mask in zip(resampled, masks):
                        writer.add(start, planes, mask)

            rows.append(
                (
                    "- write the samples (2 threads, zip framing and checksums)",
                    slices,
                    *median_run(args.repeats, write_samples, root),
                )
            )
            rows.append(
                ("- write the same npz bytes (1 thread)", slices, *median_run(args.repeats, write_payloads, root))
            )

        split = manifest.split.iloc[0]
        plain, augmented = SliceDataset(out, split), SliceDataset(out, split, augment=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as inside a DataLoader worker
        rows.append(("load_sample, 1 thread", slices, *timed(lambda: [load_sample(path) for path in plain.paths])[1:]))
        image_t, mask_t = load_sample(plain.paths[0])
        rng = np.random.default_rng(0)
        augment_every = [(image_t, mask_t)] * slices
        rows.append(
            ("augment_pair, 1 thread", slices, *timed(lambda: [augment_pair(*p, rng) for p in augment_every])[1:])
        )
        torch.set_num_threads(threads)
        for name, dataset in (("no augmentation", plain), ("augmentation", augmented)):
            wall, cpu = timed(load_epochs, dataset, args.workers, args.epochs)[1:]
            rows.append((f"DataLoader, {args.workers} workers, batch 16, {name}", args.epochs * slices, wall, cpu))

    sample_kb = sum(len(b) for b in payloads) / slices / 1024
    load = os.getloadavg()[0]
    print(f"device: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, torch {torch.__version__}")
    print(
        f"phantom {args.volume}x{args.volume}x{args.slices} -> {slices} samples of {args.size}x{args.size} "
        f"({sample_kb:.0f} KiB each, uncompressed npz)"
    )
    print("| measurement | wall ms | CPU ms | per second (wall) | CPU ms per sample |")
    print("|---|---|---|---|---|")
    for label, count, wall, cpu in rows:
        print(f"| {label} | {1000 * wall:.0f} | {1000 * cpu:.0f} | {count / wall:.0f} | {1000 * cpu / count:.2f} |")
    end_to_end = rows[0]
    for floor in rows[1:3]:
        print(f"end to end / {floor[0]}: {end_to_end[2] / floor[2]:.2f}x wall, {end_to_end[3] / floor[3]:.2f}x CPU")


if __name__ == "__main__":
    main()
