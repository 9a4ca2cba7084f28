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
    report["seconds"] = time.perf_counter() - started

    exact, split = report["exactness"], report["int_max_split"]
    print(f"\nexactness fp32: {'PASS' if exact['fp32_pass'] else 'FAIL'} (outputs {exact['fp32_output_rel']:.1e}, "
          f"gradients {exact['fp32_grad_rel']:.1e} relative)")
    print(f"exactness bf16: {'PASS' if exact['bf16_pass'] else 'FAIL'} (vs fp32: factored "
          f"{exact['bf16_factored_output_rel_vs_fp32']:.1e}, naive {exact['bf16_naive_output_rel_vs_fp32']:.1e})")
    print(f"INT_MAX split, batch {split['batch']}: {'PASS' if split['pass'] else 'FAIL'} "
          f"({split['upsample_elements_whole_batch']:.3g} elements unsplit, {split['images_per_part']} images per part, "
          f"first two vs batch of 2: {split['first_two_rel_vs_batch_of_two']:.1e})")
    print(f"total {report['seconds']:.0f} s")
    write_json_atomic(args.out, report)
    if not (exact["fp32_pass"] and exact["bf16_pass"] and split["pass"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
