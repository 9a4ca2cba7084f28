"""Everything GPU-specific, checked and timed in one run (about 5-8 minutes on one H100).

Checks (each prints PASS/FAIL and the measured error):

1. factored vs naive UNet 3+ skips on the GPU, same weights: fp32 (TF32 off) forward outputs and
   every parameter gradient within 1e-4 relative; bf16 autocast: the factored path's error
   against the fp32 result is no larger than 1.5x the naive path's own bf16 error (+1e-3).
2. the INT_MAX split: naive UNet 3+, eval, batch 32 at 320x320, bf16 autocast, channels_last
   (the official code crashes there: "upsample_bilinear2d_nhwc only supports output tensors with
   less than INT_MAX elements"); the first two images must match a batch-of-2 run.

Timings (``benchmarks/bench_models.py``, interleaved medians): training step and inference img/s
and peak memory of UNet 3+ naive / factored / auto, UNet and UNet++ at 320x320, batch 16, bf16
autocast, channels_last, cudnn.benchmark; then UNet 3+ naive and factored with torch.compile.

3. the registered volume model (``--model-uri models:/unet3plus-liver@champion``, else a tiny
   model registered in a temporary store) loaded with ``mlflow.pyfunc.load_model(...,
   model_config={"device": "cuda"})`` segments a 512 x 512 x 200 phantom CT; its mask agrees with
   the CPU's (Dice >= 0.99: bf16 autocast), and the paper model's (``configs/paper.yaml``) volume
   latency is timed.

Writes ``--out`` (JSON with every number and the device) and prints a markdown table for
``benchmarks/RESULTS.md``. ``--quick`` runs the same code at tiny sizes (width 4, 32x32, the INT_MAX
limit lowered so the split still happens), on the CPU if there is no GPU: a smoke test.

    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --quick --out /tmp/gpu_check_quick.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_models

from unet3plus.device import prepare_model, select_device
from unet3plus.models import create_model
from unet3plus.utils import write_json_atomic


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs on a CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile (default: on for CUDA without --quick)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON output (default gpu_check.json)")
    parser.add_argument("--model-uri", default=None,
                        help="registered volume model to load as pyfunc on the device and segment a phantom scan with "
                        "(e.g. models:/unet3plus-liver@champion, MLFLOW_TRACKING_URI set); default: a tiny model "
                        "registered in a temporary store")
    parser.add_argument("--volume-slices", type=int, default=200, help="slices of the 512 x 512 phantom (default 200)")
    return parser.parse_args()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def forward_backward(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> tuple[list[torch.Tensor], dict]:
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same CGM dropout mask every time
    with autocast:
        output = model(images)
        loss = sum(side.float().square().mean() for side in output.side_logits) + output.class_logits.float().mean()
    loss.backward()
    outputs = [side.detach().float() for side in output.side_logits]
    return outputs, {name: p.grad.detach().float() for name, p in model.named_parameters()}


def check_exactness(device: torch.device, width: int, size: int, batch: int) -> dict:
    """Factored vs naive on ``device`` in fp32 and bf16 (the same weights, train mode)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    naive = create_model("unet3plus", width=width, skip_impl="naive").to(device)
    factored = create_model("unet3plus", width=width, skip_impl="factored").to(device)
    factored.load_state_dict(naive.state_dict())
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    result = {}
    reference = forward_backward(naive, images, bf16=False)
    got = forward_backward(factored, images, bf16=False)
    result["fp32_output_rel"] = max(relative_error(g, w) for g, w in zip(got[0], reference[0]))
    result["fp32_grad_rel"] = max(relative_error(got[1][k], reference[1][k]) for k in reference[1])
    result["fp32_pass"] = result["fp32_output_rel"] < 1e-4 and result["fp32_grad_rel"] < 1e-4
    bf16_naive = forward_backward(naive, images, bf16=True)
    bf16_factored = forward_backward(factored, images, bf16=True)
    for name, run in (("naive", bf16_naive), ("factored", bf16_factored)):
        result[f"bf16_{name}_output_rel_vs_fp32"] = max(relative_error(g, w) for g, w in zip(run[0], reference[0]))
    result["bf16_pass"] = result["bf16_factored_output_rel_vs_fp32"] <= 1.5 * result["bf16_naive_output_rel_vs_fp32"] + 1e-3
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return result


def check_int_max_split(device: torch.device, width: int, size: int, batch: int, quick: bool) -> dict:
    """Naive UNet 3+ eval inference, bf16 + channels_last, a batch whose up-sampling exceeds INT_MAX."""
    torch.manual_seed(0)
    model = prepare_model(create_model("unet3plus", width=width, skip_impl="naive"), device).eval()
    model = model.to(memory_format=torch.channels_last)
    per_image = model.upsample_elements_per_image(size, size)
    if quick:  # tiny images never reach INT_MAX: lower the limit so that the split path runs
        model.max_upsample_elements = 3 * per_image
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        whole = model(images).logits.float()
        first_two = model(images[:2]).logits.float()
    error = relative_error(whole[:2], first_two)
    return {
        "batch": batch,
        "upsample_elements_whole_batch": per_image * batch,
        "limit": model.max_upsample_elements,
        "images_per_part": model.max_upsample_elements // per_image,
        "first_two_rel_vs_batch_of_two": error,
        "pass": bool(torch.isfinite(whole).all()) and error < 1e-2,
    }


def _phantom_scan(folder: Path, size: int, slices: int) -> Path:
    from unet3plus.data.phantom import write_dataset

    (scan,) = write_dataset("lits", folder / "raw", cases=1, seed=0, size=size, slices=slices)
    return scan


def _tiny_champion(folder: Path) -> str:
    """A tiny model registered as ``champion`` in a temporary SQLite store (``--quick`` / no ``--model-uri``)."""
    import mlflow

    from unet3plus.config import config_from_dict
    from unet3plus.serving import log_volume_model

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    config = config_from_dict({"data": {"size": 32}, "model": {"width": 4}})
    payload = {"model": create_model(**{**config.to_dict()["model"], "encoder_weights": None}).state_dict(),
               "config": config.to_dict(), "dataset": "liver", "epoch": 0}
    experiment = mlflow.MlflowClient().create_experiment("gpu-check", artifact_location=(folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_volume_model(payload, 0.5, "unet3plus-gpu-check")
    mlflow.MlflowClient().set_registered_model_alias("unet3plus-gpu-check", "champion", info.registered_model_version)
    return "models:/unet3plus-gpu-check@champion"


def check_volume_model(device: torch.device, model_uri: str | None, slices: int, quick: bool) -> dict:
    """The registered volume model loaded as pyfunc on ``device`` segments a phantom CT (issue 17).

    Loads ``model_uri`` (or a tiny model registered in a temporary store) with
    ``model_config={"device": ...}``, checks that it runs there, segments a 512 x 512 x ``slices``
    phantom (tiny sizes with ``--quick``) through ``predict`` and compares the mask with the same
    model on the CPU (Dice; bf16 autocast on CUDA rounds differently). Then times the paper's model
    (``configs/paper.yaml``, random weights) on the same volume: seconds per volume (median of 3
    after a warm-up) and slices per second. Its CGM says "organ" on every slice, so the decoder
    runs on all of them: the worst case (a trained CGM skips the organ-free slices' decoder).
    """
    import tempfile

    import mlflow
    import numpy as np
    import pandas as pd

    from unet3plus.config import load_config
    from unet3plus.data.sources import read_volume
    from unet3plus.predict import predictor_from_checkpoint
    from unet3plus.serving import decode_mask, encode_scan

    size, slices = (48, 8) if quick else (512, slices)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        scan = _phantom_scan(folder, size, slices)
        model_uri = model_uri or _tiny_champion(folder)
        rows = pd.DataFrame({"nifti_base64": [encode_scan(scan)]})
        model = mlflow.pyfunc.load_model(model_uri, model_config={"device": str(device)})
        loaded_on = model.unwrap_python_model().predictor.device
        model.predict(rows)  # warm-up: cudnn.benchmark picks its kernels
        start = time.perf_counter()
        result = model.predict(rows)
        pyfunc_seconds = time.perf_counter() - start
        mask = np.asanyarray(decode_mask(result["mask_base64"][0]).dataobj).astype(bool)
        reference = mlflow.pyfunc.load_model(model_uri, model_config={"device": "cpu"}).predict(rows)
        cpu_mask = np.asanyarray(decode_mask(reference["mask_base64"][0]).dataobj).astype(bool)
        total = int(mask.sum()) + int(cpu_mask.sum())
        dice = 1.0 if total == 0 else 2 * int((mask & cpu_mask).sum()) / total

        config = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml", [])
        if quick:
            config = load_config(None, ["data.size=32", "model.width=4", "model.encoder=resnet101"])
        network = create_model(**{**config.to_dict()["model"], "encoder_weights": None})
        if network.cgm is not None:  # "organ" on every slice: a random CGM would gate off any share of the decoder
            torch.nn.init.zeros_(network.cgm.conv.weight)
            network.cgm.conv.bias.data.copy_(torch.tensor([-100.0, 100.0]))
        payload = {"model": network.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 0}
        predictor = predictor_from_checkpoint(payload, "configs/paper.yaml", str(device), batch_size=16)
        volume = read_volume(scan)
        scan_shape = tuple(volume.shape)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            predictor.segment(volume, "paper model")
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        paper_seconds = sorted(times[1:])[1]
    return {
        "model_uri": model_uri, "loaded_on": str(loaded_on), "scan_shape": list(mask.shape),
        "pyfunc_seconds": pyfunc_seconds, "organ_voxels": int(result["organ_voxels"][0]), "dice_vs_cpu": dice,
        "paper_seconds_per_volume": paper_seconds, "paper_slices_per_second": slices / paper_seconds,
        "pass": loaded_on.type == device.type and mask.shape == scan_shape and dice >= 0.99,
    }  # fmt: skip


def main() -> None:
    args = parse_args()
    device = select_device(args.device)
    compile_models = args.compile if args.compile is not None else (device.type == "cuda" and not args.quick)
    width, size, batch, split_batch = (4, 32, 2, 8) if args.quick else (64, 320, 16, 32)
    started = time.perf_counter()
    report = {"device": bench_models.device_name(device), "torch": torch.__version__, "quick": args.quick}

    report["exactness"] = check_exactness(device, width, 97 if args.quick else size, 2)
    report["int_max_split"] = check_int_max_split(device, width, size, split_batch, args.quick)
    common = ["--device", str(device), "--width", str(width), "--size", str(size), "--batch", str(batch),
              "--bf16", "--channels-last", "--memory"]
    if args.quick:
        common += ["--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1"]
    else:
        common += ["--rounds", "5", "--steps", "3", "--warmup", "2"]
    report["eager"] = bench_models.main(common)
    if compile_models:
        report["compiled"] = bench_models.main(
            [*common, "--compile", "--no-flops", "--models", "unet3plus-naive", "unet3plus-factored"]
        )
    report["volume_model"] = check_volume_model(device, args.model_uri, args.volume_slices, args.quick)
    report["seconds"] = time.perf_counter() - started

    exact, split = report["exactness"], report["int_max_split"]
    print(f"\nexactness fp32: {'PASS' if exact['fp32_pass'] else 'FAIL'} (outputs {exact['fp32_output_rel']:.1e}, "
          f"gradients {exact['fp32_grad_rel']:.1e} relative)")
    print(f"exactness bf16: {'PASS' if exact['bf16_pass'] else 'FAIL'} (vs fp32: factored "
          f"{exact['bf16_factored_output_rel_vs_fp32']:.1e}, naive {exact['bf16_naive_output_rel_vs_fp32']:.1e})")
    print(f"INT_MAX split, batch {split['batch']}: {'PASS' if split['pass'] else 'FAIL'} "
          f"({split['upsample_elements_whole_batch']:.3g} elements unsplit, {split['images_per_part']} images per part, "
          f"first two vs batch of 2: {split['first_two_rel_vs_batch_of_two']:.1e})")
    volume = report["volume_model"]
    print(f"volume model as pyfunc on {volume['loaded_on']}: {'PASS' if volume['pass'] else 'FAIL'} ({volume['model_uri']}, "
          f"{volume['pyfunc_seconds']:.2f} s for a {volume['scan_shape']} scan, Dice vs CPU {volume['dice_vs_cpu']:.4f}); "
          f"paper model: {volume['paper_seconds_per_volume']:.2f} s per {volume['scan_shape']} volume "
          f"({volume['paper_slices_per_second']:.1f} slices/s)")
    print(f"total {report['seconds']:.0f} s")
    write_json_atomic(args.out, report)
    if not (exact["fp32_pass"] and exact["bf16_pass"] and split["pass"] and volume["pass"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
