"""Cost of the UNet 3+ loss per training step, part by part, in the paper's setting.

Five side outputs at ``--size`` (the paper's 320x320) and a CGM head, as full-scale deep
supervision produces them: forward + backward time of each part (focal, MS-SSIM, IoU, CGM BCE)
over all side outputs, and of the whole :class:`unet3plus.losses.Criterion`, median of
``--steps`` timed rounds after one warm-up. With ``--bf16`` the logits are bf16 and the loss runs
under bf16 autocast (the losses compute in float32 inside). Prints a markdown table.

    python benchmarks/bench_losses.py --device cpu --batch 2 --steps 3
    python benchmarks/bench_losses.py --device cuda --batch 16 --bf16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from unet3plus.losses import Criterion
from unet3plus.models import SegmentationOutput

ONLY = {  # Criterion weights keeping one part; the CGM BCE on (B, 2) logits is negligible and only in "all"
    "focal": {"ms_ssim_weight": 0.0, "iou_weight": 0.0, "cgm_weight": 0.0},
    "ms_ssim": {"focal_weight": 0.0, "iou_weight": 0.0, "cgm_weight": 0.0},
    "iou": {"focal_weight": 0.0, "ms_ssim_weight": 0.0, "cgm_weight": 0.0},
    "all (Criterion)": {},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--size", type=int, default=320, help="height and width of the maps (default 320)")
    parser.add_argument("--sides", type=int, default=5, help="side outputs (default 5, full-scale deep supervision)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--bf16", action="store_true", help="bf16 logits under bf16 autocast")
    return parser.parse_args()


def time_step(criterion: Criterion, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds for one forward + backward of ``criterion`` on fresh random side outputs."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    shape = (args.batch, 1, args.size, args.size)
    sides = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(args.sides)]
    class_logits = torch.randn(args.batch, 2, device=device, dtype=dtype, requires_grad=True)
    mask = (torch.rand(shape, device=device) > 0.7).float()
    organ_present = (torch.rand(args.batch, device=device) > 0.5).float()
    output = SegmentationOutput(logits=sides[0], side_logits=tuple(sides), class_logits=class_logits)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        total = criterion(output, mask, organ_present)["total"]
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    print(
        f"Loss cost per step on {name} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}: "
        f"batch {args.batch}, {args.sides} side outputs of {args.size}x{args.size}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, median of {args.steps} steps\n"
    )
    print("| part | forward + backward (ms) |\n|---|---|")
    for part, weights in ONLY.items():
        criterion = Criterion(**weights)
        time_step(criterion, args, device)  # warm-up: kernels, allocator
        median = statistics.median(time_step(criterion, args, device) for _ in range(args.steps))
        print(f"| {part} | {1000 * median:.1f} |")


if __name__ == "__main__":
    main()
