"""Whole-volume prediction, today's code against the new inference path, side by side in one process.

A 512 x 512 x Z phantom CT (``unet3plus.data.phantom.write_dataset``, LiTS layout) is segmented
from its file to a mask in memory (read, preprocess, network, back to the scan's grid, threshold)
with each model of ``--configs`` (default: ``params.yaml``'s model and ``configs/paper.yaml``'s):

- ``today``: the predict path before issue 17, rebuilt from the library pieces it used: the
  checkpoint's network as trained (batch norms, every deep-supervision head), contiguous NCHW
  layout, ``predict_slices`` then ``restore_volume`` copied into C order (as it returned then), then
  the threshold and ``write_mask``;
- ``new``: :meth:`unet3plus.predict.Predictor.segment` as ``unet3plus predict`` and the registered
  model run it (batch norm folded into the convolutions, side heads dropped, the decoder skipped on
  slices the CGM gates off, channels_last, the restored volume kept in the file's Fortran order),
  then ``write_mask``.

The weights are random but "trained-looking" (:func:`trained_looking_checkpoint`): every batch
norm gets seeded non-trivial running statistics and affine parameters, so folding is not the
identity; the CGM is fitted to the phantom's organ slices (a linear probe on the encoder's deepest
maps, ``--cgm fitted``) or says "organ present" everywhere (``--cgm always``, the worst case for the
new path); the final head's bias makes half of the organ slices' voxels organ (:func:`calibrate`).
So the Dice check is meaningful: a quarter of the voxels are foreground, many of them close to
the threshold, and the JSON lists how many voxels differ. Rounds alternate the order of the two
paths (today/new, then new/today) so load from other processes on a shared machine hits both
alike; seconds per volume are medians over rounds and the speed-up is the median of the per-round
ratios. The phantom keeps its organ on about half of the slices whatever ``--slices`` is (its slice
thickness follows), so a reduced slice count gives the same ratios at less cost.

    python benchmarks/bench_inference.py --out bench_inference.json                 # both models, Z = 200
    python benchmarks/bench_inference.py --configs configs/paper.yaml --slices 32   # the paper model, fewer slices
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
from unet3plus.data.geometry import canonical_slab, restore_volume
from unet3plus.data.phantom import write_dataset
from unet3plus.data.sources import read_volume
from unet3plus.data.transforms import prepare_volume
from unet3plus.models import create_model
from unet3plus.models.inference import randomize_batch_norms
from unet3plus.predict import ProbabilityModel, predict_slices, predictor_from_checkpoint, read_scan, write_mask
from unet3plus.utils import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]


def trained_looking_checkpoint(config_path: Path, scan_path: Path, cgm: str) -> tuple[dict, dict]:
    """A checkpoint dict of the config's model with seeded weights, randomised batch norms
    (:func:`~unet3plus.models.inference.randomize_batch_norms`) and a calibrated head (:func:`calibrate`),
    and what the calibration measured."""
    config = load_config(config_path, [])
    torch.manual_seed(0)
    model = create_model(**{**dataclasses.asdict(config.model), "encoder_weights": None})
    randomize_batch_norms(model, seed=1).eval()
    scan = read_volume(scan_path)
    stacks, geometry = prepare_volume(np.asarray(scan.get_fdata(dtype=np.float32)), scan.affine, config.data)
    _, label_planes = canonical_slab(np.asanyarray(read_volume(label_path(scan_path)).dataobj), 0, geometry)
    organ = torch.from_numpy(label_planes.reshape(len(label_planes), -1).any(axis=1))
    calibration = calibrate(model, torch.from_numpy(stacks), organ, cgm)
    return {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 0}, calibration


def label_path(scan_path: Path) -> Path:
    """The phantom's LiTS label of ``volume-N.nii``: ``segmentation-N.nii``."""
    return scan_path.with_name(scan_path.name.replace("volume-", "segmentation-"))


@torch.no_grad()
def calibrate(model: torch.nn.Module, stacks: torch.Tensor, organ: torch.Tensor, cgm: str) -> dict:
    """Make random weights segment like a trained model would, so that the masks are worth comparing and
    the CGM gates off the slices a trained one would.

    - CGM (``cgm="fitted"``): its 1x1 convolution is fitted as a linear probe on the encoder's deepest
      maps of :data:`PROBE_SLICES` evenly spaced slices to the phantom's label (organ in the slice or not),
      so it says "organ present" on about the slices that hold the liver (half of the phantom's) as a
      trained CGM does; ``cgm="always"``: it says "organ present" on every slice (the worst case for
      the new path, whose decoder then runs everywhere as today's).
    - Final head: its bias puts the median logit of organ slices at 0, so about half of their
      voxels are organ, the most voxels possible sit near the threshold (where rounding differences
      between the paths would show), and two masks that agree are far from trivially equal (an
      untouched random head gives an empty mask: Dice 1 for nothing).
    """
    organ_slices = organ.nonzero().flatten()
    middle = organ_slices[len(organ_slices) // 2 - 2 : len(organ_slices) // 2 + 2]
    report = {"organ_slice_fraction": float(organ.float().mean())}
    if model.cgm is not None:
        if cgm == "fitted":
            probe = torch.linspace(0, len(stacks) - 1, min(PROBE_SLICES, len(stacks))).round().long()
            report.update(fit_cgm_probe(model, stacks[probe], organ[probe]))
        else:  # no weights: a bias alone cannot outweigh the random encoder's huge deepest maps
            model.cgm.conv.weight.zero_()
            model.cgm.conv.bias.copy_(torch.tensor([-100.0, 100.0]))
    saved, model.cgm = model.cgm, None  # the head's calibration must see the middle organ slices ungated
    model.heads[0].conv.bias -= model(stacks[middle]).logits.median()
    model.cgm = saved
    return report


PROBE_SLICES = 12
"""The CGM probe is fitted on 12 evenly spaced slices (the paper model's encoder on all 200 would take minutes)."""


@torch.enable_grad()
def fit_cgm_probe(model: torch.nn.Module, stacks: torch.Tensor, organ: torch.Tensor, steps: int = 300) -> dict:
    """Fit the CGM's 1x1 convolution (the encoder frozen) to say "organ present" (class 1) exactly where ``organ``.

    The random encoder's deepest maps are huge (around 2e4 at width 64) and vary little between
    slices, so the probe is fitted on per-channel standardised maps and the standardisation is then
    folded into the convolution's weights and bias.
    """
    with torch.no_grad():
        deepest = torch.cat([model.encoder(batch)[-1] for batch in stacks.split(4)])
        mean, std = deepest.mean(dim=(0, 2, 3)), deepest.std(dim=(0, 2, 3)).clamp(min=1e-6)
        standardised = (deepest - mean[:, None, None]) / std[:, None, None]
    probe = torch.nn.Conv2d(deepest.shape[1], 2, kernel_size=1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01)
    target = organ.long()
    weights = len(target) / (2 * torch.bincount(target, minlength=2).clamp(min=1)).float()  # balanced classes
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model.cgm.pool(probe(standardised)).flatten(1), target, weight=weights)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weight = probe.weight[:, :, 0, 0] / std
        model.cgm.conv.weight.copy_(weight[:, :, None, None])
        model.cgm.conv.bias.copy_(probe.bias - weight @ mean)
        accuracy = (model.cgm(deepest).argmax(dim=1) == target).float().mean()
    return {"probe_slices": len(target), "probe_accuracy": float(accuracy)}


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
    parser.add_argument("--cgm", choices=("fitted", "always"), default="fitted",
                        help="the CGM of models that have one: fitted to the phantom's organ slices (default), or "
                             "'organ present' on every slice (the new path's worst case: nothing is gated off)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        (scan_path,) = write_dataset("lits", Path(folder) / "raw", cases=1, seed=0, size=512, slices=args.slices)
        for config_path in args.configs:
            checkpoint, calibration = trained_looking_checkpoint(config_path, scan_path, args.cgm)
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
                "voxels_differing": int(np.count_nonzero(masks["today"] != masks["new"])),
                "foreground_fraction": float(masks["today"].mean()),
                "slices_with_organ_in_mask": float(masks["new"].any(axis=(0, 1)).mean()), **calibration,
            }  # fmt: skip
            results.append(row)
            print(f"{row['config']}: today {row['seconds_today']:.2f} s/volume ({args.slices / row['seconds_today']:.1f} "
                  f"slices/s), new {row['seconds_new']:.2f} s/volume ({args.slices / row['seconds_new']:.1f} slices/s), "
                  f"speed-up {row['speedup']:.2f}x [{', '.join(f'{r:.2f}' for r in ratios)}], Dice {row['dice_new_vs_today']:.5f}, "
                  f"{row['voxels_differing']} voxels differ, foreground {row['foreground_fraction']:.3f} of the voxels, "
                  f"organ in {row['slices_with_organ_in_mask']:.2f} of the slices (label: "
                  f"{row['organ_slice_fraction']:.2f})", flush=True)  # fmt: skip
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": "cpu", "machine": platform.machine(),
        "processor": platform.processor(), "cores": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "python": sys.version.split()[0], "slices": args.slices,
        "batch_size": args.batch_size, "rounds": args.rounds, "cgm": args.cgm, "load_average": os.getloadavg(),
        "results": results,
    }  # fmt: skip
    if args.out:
        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
