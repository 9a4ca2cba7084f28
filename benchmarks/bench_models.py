"""Speed, size and cost of UNet, UNet++ and UNet 3+, measured side by side in one run.

For each architecture: parameters, forward GFLOPs per image at the paper's 320x320 (counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so no compute is spent; it
counts convolutions and matrix products, 2 FLOPs per multiply-add, which is the paper's
convention), and forward + backward throughput at ``--size`` with the timed rounds interleaved
across architectures so that machine noise hits all three alike. Prints a markdown snippet.

    python benchmarks/bench_models.py --device cpu --size 64 --batch 2 --steps 3 --threads 1
    python benchmarks/bench_models.py --device cuda --batch 16 --size 320 --channels-last --bf16
    python benchmarks/bench_models.py --params-table   # parameters: 3 archs x 3 encoders vs the paper
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unet3plus.models import ARCHITECTURES, ENCODERS, create_model

ARCH_NAMES = {"unet": "UNet", "unet2plus": "UNet++", "unet3plus": "UNet 3+"}
PAPER_PARAMS_M = {  # Huang et al. 2020, Table 1 (width 64, 1 class)
    "unet": {"unet": 39.39, "resnet101": 55.90},
    "unet2plus": {"unet": 47.18, "resnet101": 63.76},
    "unet3plus": {"unet": 26.97, "resnet101": 43.55},
}
PAPER_GFLOPS = {"unet": 171, "unet2plus": 422, "unet3plus": 618}  # forward, 320x320
PAPER_SIZE = 320


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--size", type=int, default=320, help="image height and width for timing (default 320)")
    parser.add_argument("--width", type=int, default=64, help="first-stage channels (default 64, the paper)")
    parser.add_argument("--encoder", default="unet", choices=list(ENCODERS), help="encoder (default unet)")
    parser.add_argument("--deep-supervision", action="store_true", help="time with deep supervision heads")
    parser.add_argument("--cgm", action="store_true", help="time with the classification-guided module")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per architecture and round (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per architecture (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--params-table", action="store_true", help="print the parameter table of docs/params_table.md and exit"
    )
    return parser.parse_args()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(arch: str, encoder: str, width: int, **options: bool) -> torch.nn.Module:
    """The model with shapes but no storage: counting parameters and FLOPs costs nothing."""
    with torch.device("meta"):
        return create_model(arch, encoder=encoder, width=width, **options)


def forward_gflops(arch: str, encoder: str, width: int, size: int, **options: bool) -> float:
    model = meta_model(arch, encoder, width, **options)
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def params_table() -> str:
    """Markdown table: parameters (M) of every arch x encoder at width 64 beside the paper's."""
    lines = [
        "| model | ours: unet encoder | paper: \"VGG-16\" | ours: vgg16 (VGG-16-BN) | ours: resnet101 "
        "| paper: ResNet-101 |",
        "|---|---|---|---|---|---|",
    ]
    for arch in ARCHITECTURES:
        ours = {e: count_parameters(meta_model(arch, e, 64, deep_supervision=False, cgm=False)) / 1e6 for e in ENCODERS}
        paper = PAPER_PARAMS_M[arch]
        lines.append(
            f"| {ARCH_NAMES[arch]} | {ours['unet']:.2f} | {paper['unet']:.2f} | {ours['vgg16']:.2f} "
            f"| {ours['resnet101']:.2f} | {paper['resnet101']:.2f} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, images, autocast) -> None:
    with autocast():
        output = model(images)
        sides = [side.float() for side in output.side_logits]
        loss = sum(F.binary_cross_entropy_with_logits(side, torch.zeros_like(side)) for side in sides)
        if output.class_logits is not None:
            loss = loss + output.class_logits.float().logsumexp(dim=1).mean()
    model.zero_grad(set_to_none=True)
    loss.backward()


def main() -> None:
    args = parse_args()
    if args.params_table:
        print(params_table())
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    options = {"deep_supervision": args.deep_supervision, "cgm": args.cgm}
    if args.bf16:
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=memory_format)
    models = {
        arch: create_model(arch, encoder=args.encoder, width=args.width, **options)
        for arch in ARCHITECTURES
    }
    for model in models.values():
        model.to(device, memory_format=memory_format)
    seconds = dict.fromkeys(models, 0.0)
    peak_memory = {}
    for arch, model in models.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            train_step(model, images, autocast)
        synchronize(device)
        if device.type == "cuda":
            peak_memory[arch] = torch.cuda.max_memory_allocated(device) / 2**30
    for _ in range(args.rounds):
        for arch, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, images, autocast)
            synchronize(device)
            seconds[arch] += time.perf_counter() - start
    images_per_second = {arch: args.rounds * args.steps * args.batch / s for arch, s in seconds.items()}

    precision = "bf16 autocast" if args.bf16 else "fp32"
    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"Device: {device_name(device)}; torch {torch.__version__}; encoder {args.encoder}, width {args.width}, "
        f"deep supervision {args.deep_supervision}, CGM {args.cgm}; forward + backward at batch {args.batch}, "
        f"{args.size}x{args.size}, {precision}, {layout}; "
        f"{args.rounds} x {args.steps} timed steps after {args.warmup} warm-up.\n"
    )
    memory_header = " peak GPU memory (GiB) |" if peak_memory else ""
    print(
        f"| model | params (M) | GFLOPs/image, fwd @{PAPER_SIZE} | paper GFLOPs | images/s | speed vs UNet |"
        f"{memory_header}"
    )
    print("|---|---|---|---|---|---|" + ("---|" if peak_memory else ""))
    for arch, model in models.items():
        gflops = forward_gflops(arch, args.encoder, args.width, PAPER_SIZE, **options)
        memory = f" {peak_memory[arch]:.2f} |" if peak_memory else ""
        print(
            f"| {ARCH_NAMES[arch]} | {count_parameters(model) / 1e6:.2f} | {gflops:.1f} | {PAPER_GFLOPS[arch]} "
            f"| {images_per_second[arch]:.2f} | {images_per_second[arch] / images_per_second['unet']:.2f} |{memory}"
        )


if __name__ == "__main__":
    main()
