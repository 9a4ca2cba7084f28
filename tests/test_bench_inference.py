"""benchmarks/bench_inference.py's model preparation: its Dice check compares masks worth comparing."""

import importlib.util
from pathlib import Path

import numpy as np
import yaml

from unet3plus.data.phantom import write_dataset

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "benchmarks" / "bench_inference.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_fitted_cgm_gates_off_organ_free_slices_and_both_paths_give_a_substantial_mask(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"size": 32}, "model": {"width": 4, "cgm": True}}))
    (scan,) = write_dataset("lits", tmp_path / "raw", cases=1, seed=0, size=48, slices=16)
    checkpoint, calibration = bench.trained_looking_checkpoint(config, scan, "fitted")
    assert calibration["probe_accuracy"] == 1.0 and calibration["probe_slices"] == 12
    masks = {name: path(checkpoint, scan, 4, tmp_path / f"{name}.nii.gz") for name, path in
             (("today", bench.today), ("new", bench.new))}  # fmt: skip
    assert bench.dice(masks["today"], masks["new"]) >= 0.999
    label = np.asanyarray(bench.read_volume(bench.label_path(scan)).dataobj) > 0
    organ_slices, mask_slices = label.any(axis=(0, 1)), masks["new"].any(axis=(0, 1))
    assert 0.2 < organ_slices.mean() < 0.8
    assert 0.2 < mask_slices.mean() < 0.9, "the CGM gates off some slices, not all"
    assert (mask_slices == organ_slices).mean() >= 0.75, "it gates off (mostly) the organ-free slices"
    assert 0.1 < masks["new"][:, :, mask_slices].mean() < 0.9, "about half of a gated-in slice is organ"
