"""Whole-volume prediction, today's code against the new inference path, side by side in one process.

A 512 x 512 x Z phantom CT (``unet3plus.data.phantom.write_dataset``, LiTS layout) is segmented
from its file to a mask in memory (read, preprocess, network, back to the scan's grid, threshold)
with each model of ``--configs`` (default: ``params.yaml``'s model and ``configs/paper.yaml``'s):

- ``today``: the predict path before issue 17, rebuilt from the library pieces it used: the
  checkpoint's network as trained (batch norms, every deep-supervision head), contiguous NCHW
  layout, ``predict_slices`` then ``restore_volume`` copied into C order (as it returned then), then
  the threshold and ``write_mask``;
- ``new``: :meth:`unet3plus.predict.Predictor.segment` as ``unet3plus predict`` and the registered
  model run it (batch norm folded into the convolutions, side heads dropped, channels_last, the
  restored volume kept in the file's Fortran order), then ``write_mask``.

The weights are random but "trained-looking": every batch norm gets seeded non-trivial running
statistics and affine parameters, so folding is not the identity, and :func:`calibrate` makes
about half of the voxels organ. Rounds alternate the order of
the two paths (today/new, then new/today) so load from other processes on a shared machine hits
both alike; seconds per volume are medians over rounds and the speed-up is the median of the
per-round ratios. Masks are compared by Dice (1 when both are empty).

    python benchmarks/bench_inference.py --out bench_inference.json                 # both models, Z = 200
    python benchmarks/bench_inference.py --configs configs/paper.yaml --slices 16   # the paper model, a slab
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from unet3plus.checkpoint import model_from_checkpoint
from unet3plus.config import config_from_dict, load_config
from unet3plus.data.geometry import restore_volume
from unet3plus.data.phantom import write_dataset
from unet3plus.data.sources import read_volume
from unet3plus.data.transforms import prepare_volume
from unet3plus.models import create_model
from unet3plus.predict import ProbabilityModel, predict_slices, predictor_from_checkpoint, read_scan, write_mask
from unet3plus.utils import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def trained_looking_checkpoint(config_path: Path, scan_path: Path) -> dict:
    """A checkpoint dict of the config's model with seeded weights and non-trivial batch-norm statistics,
    calibrated on the middle slices of ``scan_path``."""
    config = load_config(config_path, [])
    torch.manual_seed(0)
    model = create_model(**{**dataclasses.asdict(config.model), "encoder_weights": None})
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.2, 0.2, generator=generator)
    scan = read_volume(scan_path)
    stacks, _ = prepare_volume(np.asarray(scan.get_fdata(dtype=np.float32)), scan.affine, config.data)
    middle = len(stacks) // 2
    calibrate(model.eval(), torch.from_numpy(np.ascontiguousarray(stacks[max(middle - 2, 0) : middle + 2])))
    return {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 0}


@torch.no_grad()
def calibrate(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Make random weights give a mask worth comparing: the CGM says "organ present" on every slice
    (else a random CGM may gate every slice off: two empty masks agree trivially) and the final
    head's bias puts the median logit of ``images`` (slices of the scan) at 0 (about half the voxels organ, so the
    most voxels possible sit near the threshold, where rounding differences would show)."""
    if model.cgm is not None:
        model.cgm.conv.bias.copy_(torch.tensor([-100.0, 100.0]))
    model.heads[0].conv.bias -= model(images).logits.median()


def today(checkpoint: dict, scan_path: Path, batch_size: int, output: Path) -> np.ndarray:
    """The predict path before issue 17: unfolded network, all heads, contiguous layout, a C-ordered restored volume."""
    network = ProbabilityModel(model_from_checkpoint(checkpoint)).eval()
    config = config_from_dict({"data": checkpoint["config"]["data"]}).data
    scan = read_volume(scan_path)
    stacks, geometry = prepare_volume(np.asarray(scan.get_fdata(dtype=np.float32)), scan.affine, config)
    probabilities = predict_slices(network, stacks, batch_size, torch.device("cpu"), description="today",
                                   memory_format=torch.contiguous_format)  # fmt: skip
    restored = np.ascontiguousarray(restore_volume(probabilities[:, 0], geometry, "linear"))
    mask = restored > checkpoint["config"]["evaluate"]["threshold"]
    write_mask(output, mask, scan)
    return mask


def new(checkpoint: dict, scan_path: Path, batch_size: int, output: Path) -> np.ndarray:
    """What ``unet3plus predict`` and the registered model run now."""
    predictor = predictor_from_checkpoint(checkpoint, "benchmark", "cpu", batch_size=batch_size)
    scan = read_scan(scan_path)
    mask = predictor.segment(scan, "new")
    write_mask(output, mask, scan)
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, default=[ROOT / "params.yaml", ROOT / "configs" / "paper.yaml"])
    parser.add_argument("--slices", type=int, default=200, help="axial slices of the 512 x 512 phantom (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (evaluate.batch_size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        (scan_path,) = write_dataset("lits", Path(folder) / "raw", cases=1, seed=0, size=512, slices=args.slices)
        for config_path in args.configs:
            checkpoint = trained_looking_checkpoint(config_path, scan_path)
            paths = {"today": today, "new": new}
            seconds = {name: [] for name in paths}
            ratios, masks = [], {}
            for round_index in range(args.rounds):
                order = list(paths) if round_index % 2 == 0 else list(reversed(paths))
                for name in order:
                    start = time.perf_counter()
                    masks[name] = paths[name](checkpoint, scan_path, args.batch_size, Path(folder) / f"{name}.nii.gz")
                    seconds[name].append(time.perf_counter() - start)
                ratios.append(seconds["today"][-1] / seconds["new"][-1])
            row = {
                "config": str(config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path),
                "model": checkpoint["config"]["model"], "size": checkpoint["config"]["data"]["size"],
                "seconds_today": statistics.median(seconds["today"]), "seconds_new": statistics.median(seconds["new"]),
                "all_seconds": seconds, "speedup": statistics.median(ratios), "speedups": ratios,
                "dice_new_vs_today": dice(masks["today"], masks["new"]),
                "foreground_fraction": float(masks["today"].mean()),
            }  # fmt: skip
            results.append(row)
            print(f"{row['config']}: today {row['seconds_today']:.2f} s/volume ({args.slices / row['seconds_today']:.1f} "
                  f"slices/s), new {row['seconds_new']:.2f} s/volume ({args.slices / row['seconds_new']:.1f} slices/s), "
                  f"speed-up {row['speedup']:.2f}x [{', '.join(f'{r:.2f}' for r in ratios)}], Dice {row['dice_new_vs_today']:.5f}, "
                  f"foreground {row['foreground_fraction']:.3f}", flush=True)  # fmt: skip
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": "cpu", "machine": platform.machine(),
        "processor": platform.processor(), "cores": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "python": sys.version.split()[0], "slices": args.slices,
        "batch_size": args.batch_size, "rounds": args.rounds, "load_average": os.getloadavg(), "results": results,
    }  # fmt: skip
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
