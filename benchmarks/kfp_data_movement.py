"""Bytes each Kubeflow step downloads as input artifacts, for a LiTS-sized dataset: computed, not measured.

Compiles the pipeline without and with a workspace claim, reads which artifacts every task takes
as inputs (the KFP launcher downloads each one into the pod before the step starts), and prices
them with the sizes below. With a claim, the raw and preprocessed datasets are ``location.json``
references; the steps then read from the claim, and evaluate opens only the test cases.

    python benchmarks/kfp_data_movement.py          # a Markdown table

Sizes (LiTS training set: 131 CT volumes, 58,638 axial slices of 512 x 512; test split = cases
0-27, taken as 28/131 of the slices):

- raw: int16 image + uint8 label per voxel, uncompressed NIfTI: 786,432 B per slice.
- preprocessed at 320 px: one npz per slice, float16 3 x 320 x 320 stack + uint8 mask + flag,
  plus zip/npy framing (about 900 B): 717,700 B per slice.
- model artifact: the paper's UNet 3+ (26.99 M parameters, fp32) in best.pt and last.pt, each
  weights + SGD momentum: 4 x 26.99 M x 2 x 2 B.
- evaluation artifact: about 50 MB (predicted masks as .nii.gz, overlays, tables).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLICES, CASES, TEST_CASES = 58_638, 131, 28
RAW = SLICES * 512 * 512 * 3
PROCESSED = SLICES * 717_700
MODEL = 4 * 26_990_000 * 2 * 2
EVALUATION = 50_000_000
REFERENCE = 100  # location.json
TEST = TEST_CASES / CASES


def _inputs(spec: dict) -> dict[str, list[tuple[str, str]]]:
    """Task -> the (producer task, output) artifacts it downloads (loop bodies through their channels)."""
    found = {}
    components = [spec["root"]] + [c for c in spec["components"].values() if "dag" in c]
    for component in components:
        for name, task in component["dag"]["tasks"].items():
            if "parameterIterator" in task:
                continue
            for artifact in task.get("inputs", {}).get("artifacts", {}).values():
                source = artifact.get("taskOutputArtifact")
                if source is None:
                    producer, _, output = artifact["componentInputArtifact"].removeprefix("pipelinechannel--") \
                        .rpartition("-")
                    source = {"producerTask": producer, "outputArtifactKey": output}
                found.setdefault(name, []).append((source["producerTask"], source["outputArtifactKey"]))
    return found


def downloads(workspace: bool) -> dict[str, int]:
    """Bytes each task downloads, per task of the compiled pipeline (ablation tasks once each)."""
    from kfp import compiler

    from pipeline import ClusterSettings, build_pipeline

    cluster = ClusterSettings(workspace_pvc="unet3plus-data" if workspace else None)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(cluster), str(path))
        spec = next(yaml.safe_load_all(path.read_text()))
    size = {("raw-data", "raw"): REFERENCE if workspace else RAW,
            ("preprocess-data", "processed"): REFERENCE if workspace else PROCESSED}
    other = {"model": MODEL, "evaluation": EVALUATION}
    return {task: sum(size.get(source, other.get(source[1], 0)) for source in sources)
            for task, sources in sorted(_inputs(spec).items())}


def claim_reads() -> dict[str, int]:
    """Bytes each data step reads from the claim instead (evaluate: the test cases only)."""
    train_share = (CASES - TEST_CASES) / CASES
    return {"validate-data": RAW, "preprocess-data": RAW, "train-model": int(PROCESSED * train_share),
            "evaluate-model": int((RAW + PROCESSED) * TEST)}


def main() -> None:
    before, after, reads = downloads(False), downloads(True), claim_reads()
    print("| step | downloads without a claim | downloads with --workspace-pvc | read from the claim |")
    print("|---|---|---|---|")
    for task in sorted(set(before) | set(after)):
        read = reads.get(task.removesuffix("-2"), 0)
        print(f"| {task} | {before.get(task, 0) / 1e9:.2f} GB | {after.get(task, 0) / 1e9:.3f} GB | "
              f"{read / 1e9:.1f} GB |")
    ablations = len(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
                    ["ablations"]["run"])
    per_run = {False: before, True: after}
    for workspace, table in per_run.items():
        total = sum(value * (ablations if task.endswith("-2") else 1) for task, value in table.items())
        print(f"\nPer run with {ablations} ablations, {'with' if workspace else 'without'} a claim: "
              f"{total / 1e9:.1f} GB downloaded.")


if __name__ == "__main__":
    main()
