"""Speed, memory and cost of UNet 3+ (naive and factored skips), UNet and UNet++, side by side in one run.

For each model variant: parameters; forward GFLOPs per image at 320x320 (counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, no compute spent; convolutions
and matrix products, 2 FLOPs per multiply-add); training-step and inference throughput at
``--size``; peak memory. Variants: ``unet3plus-naive`` and ``unet3plus-factored`` (the two
``skip_impl`` paths of UNet 3+, same weights), ``unet3plus-auto`` (the default per-skip choice),
``unet`` and ``unet2plus``.

Timing: a training step is forward + backward (deep supervision and CGM on unless turned off,
BCE on every side output); inference is one eval-mode forward without gradients. Each round
times ``--steps`` steps of every variant in turn (interleaved), so load from other processes hits
all variants alike; images/s is the median over rounds, and the speed-up of a variant over
``unet3plus-naive`` is the median of the per-round ratios.

Peak memory (``--memory``): what one training step or one inference of the variant needs: its
weights plus the largest growth during warm-up and steps. On CUDA: ``torch.cuda.max_memory_allocated``
minus the memory allocated before the step, plus the variant's weights (allocator caching not
included). On CPU: a fresh subprocess per variant and mode, growth of the peak resident set size (the
kernel's VmHWM, reset after the model and inputs were built) over the resident size then, plus
the weights: it includes allocator overhead and freed-but-unreturned pages, so it is an upper
bound of what the tensors needed.

On CPU the process CPU time per step (``time.process_time``) is recorded beside the wall time:
on a machine shared with other jobs it is the steadier measure (it does not count time the
process waited for a core, but does count OpenMP threads spinning while they wait for each other).

    # the CPU targets (width 64, batch 2, fp32, 2 threads): factored vs naive
    python benchmarks/bench_models.py --size 64 --batch 2 --threads 2 --models unet3plus-naive unet3plus-factored
    # everything on a GPU, bf16 + channels_last, JSON for RESULTS.md
    python benchmarks/bench_models.py --device cuda --size 320 --batch 16 --bf16 --channels-last --memory --json out.json
    python benchmarks/bench_models.py --params-table   # parameters: 3 archs x 3 encoders vs the paper
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unet3plus.models import ARCHITECTURES, ENCODERS, create_model
from unet3plus.utils import write_json_atomic

ARCH_NAMES = {"unet": "UNet", "unet2plus": "UNet++", "unet3plus": "UNet 3+"}
PAPER_PARAMS_M = {  # Huang et al. 2020, Table 1 (width 64, 1 class)
    "unet": {"unet": 39.39, "resnet101": 55.90},
    "unet2plus": {"unet": 47.18, "resnet101": 63.76},
    "unet3plus": {"unet": 26.97, "resnet101": 43.55},
}
VARIANTS = {  # name -> (arch, create_model keywords)
    "unet3plus-naive": ("unet3plus", {"skip_impl": "naive"}),
    "unet3plus-factored": ("unet3plus", {"skip_impl": "factored"}),
    "unet3plus-auto": ("unet3plus", {"skip_impl": "auto"}),
    "unet": ("unet", {}),
    "unet2plus": ("unet2plus", {}),
}
BASELINE = "unet3plus-naive"
FLOP_SIZE = 320
MODES = ("train", "infer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="variants to time")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="train and/or infer")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--size", type=int, default=64, help="image height and width for timing (default 64)")
    parser.add_argument("--width", type=int, default=64, help="first-stage channels (default 64, the paper)")
    parser.add_argument("--encoder", default="unet", choices=list(ENCODERS), help="encoder (default unet)")
    parser.add_argument(
        "--deep-supervision", action=argparse.BooleanOptionalAction, default=True, help="side heads (default on)"
    )
    parser.add_argument("--cgm", action=argparse.BooleanOptionalAction, default=True, help="the CGM (default on)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and mode (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's choice)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory (CPU: one subprocess each)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per variant and mode")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--params-table", action="store_true", help="print the parameter table of the README and exit"
    )
    parser.add_argument("--probe", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def build(variant: str, args: argparse.Namespace, device: torch.device | str) -> torch.nn.Module:
    arch, options = VARIANTS[variant]
    with torch.device(device):
        return create_model(
            arch, encoder=args.encoder, width=args.width, deep_supervision=args.deep_supervision, cgm=args.cgm,
            **options,
        )


def forward_gflops(variant: str, args: argparse.Namespace, size: int = FLOP_SIZE) -> float:
    model = build(variant, args, "meta")
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
        ours = {}
        for encoder in ENCODERS:
            with torch.device("meta"):
                model = create_model(arch, encoder=encoder, width=64, deep_supervision=False, cgm=False)
            ours[encoder] = count_parameters(model) / 1e6
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


class Runner:
    """One variant ready to step: model, input batch, precision."""

    def __init__(self, variant: str, args: argparse.Namespace, device: torch.device) -> None:
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = build(variant, args, "cpu").to(device, memory_format=self.memory_format)
        self.weights_bytes = state_bytes(self.model)
        self.forward = torch.compile(self.model) if args.compile else self.model
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
        self.images = images.to(device).contiguous(memory_format=self.memory_format)
        self.bf16, self.device = args.bf16, device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, mode: str) -> None:
        if mode == "infer":
            self.model.eval()
            with torch.no_grad(), self.autocast():
                self.forward(self.images)
            return
        self.model.train()
        with self.autocast():
            output = self.forward(self.images)
            loss = sum(F.binary_cross_entropy_with_logits(s.float(), torch.zeros_like(s.float())) for s in output.side_logits)
            if output.class_logits is not None:
                loss = loss + output.class_logits.float().logsumexp(dim=1).mean()
        self.model.zero_grad(set_to_none=True)
        loss.backward()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def probe_cpu_memory(variant: str, mode: str, args: argparse.Namespace) -> None:
    """Subprocess side of ``--memory`` on CPU: print the peak-RSS growth of one variant and mode as JSON.

    The kernel's high-water mark (VmHWM) is reset right before the steps (``/proc/self/clear_refs``
    = 5), so an earlier peak (imports, model construction) cannot hide the steps' own; where that
    is not allowed, ``ru_maxrss`` (never reset) is the fallback.
    """
    runner = Runner(variant, args, torch.device("cpu"))
    gc.collect()
    before = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")

        def peak() -> int:
            return _status_bytes("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def peak() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup + 1):
        runner.step(mode)
    print(json.dumps({"peak_bytes": peak() - before + runner.weights_bytes}))


def cpu_peak_memory(variant: str, mode: str, argv: list[str]) -> float:
    command = [sys.executable, __file__, *argv, "--probe", variant, mode]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def cuda_peak_memory(runner: Runner, mode: str) -> float:
    device = runner.device
    runner.model.zero_grad(set_to_none=True)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step(mode)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before + runner.weights_bytes) / 2**20


def print_profile(name: str, runner: Runner, mode: str) -> None:
    """The ops that take the time in one step (after one warm-up step), by self CPU time."""
    runner.step(mode)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        runner.step(mode)
        synchronize(runner.device)
    sort_by = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{name}, {mode}:\n{profiler.key_averages().table(sort_by=sort_by, row_limit=12)}")


def time_variants(
    runners: dict[str, Runner], mode: str, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of every variant in every round (rounds interleave the variants)."""
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(mode)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            synchronize(runner.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                runner.step(mode)
            synchronize(runner.device)
            wall[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.params_table:
        print(params_table())
        return {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe:
        probe_cpu_memory(*args.probe, args)
        return {}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    runners = {name: Runner(name, args, device) for name in args.models}
    results: dict[str, dict] = {
        name: {"params_m": count_parameters(runner.model) / 1e6} for name, runner in runners.items()
    }
    if args.flops:
        for name in runners:
            results[name][f"gflops_fwd_{FLOP_SIZE}"] = forward_gflops(name, args)
    for mode in args.modes:
        if args.profile:
            for name, runner in runners.items():
                print_profile(name, runner, mode)
        seconds, cpu_seconds = time_variants(runners, mode, args)
        for name, times in seconds.items():
            results[name][f"{mode}_img_s"] = args.batch / statistics.median(times)
            results[name][f"{mode}_seconds_per_step"] = times
            results[name][f"{mode}_cpu_seconds_per_step"] = cpu_seconds[name]
            if BASELINE in seconds:
                ratios = [base / own for base, own in zip(seconds[BASELINE], times)]
                results[name][f"{mode}_speedup_vs_naive"] = statistics.median(ratios)
                if device.type == "cpu":
                    cpu_ratios = [base / own for base, own in zip(cpu_seconds[BASELINE], cpu_seconds[name])]
                    results[name][f"{mode}_cpu_time_speedup_vs_naive"] = statistics.median(cpu_ratios)
        if args.memory:
            for name, runner in runners.items():
                peak = cuda_peak_memory(runner, mode) if device.type == "cuda" else cpu_peak_memory(name, mode, argv)
                results[name][f"{mode}_peak_mib"] = peak

    settings = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_models.py " + " ".join(argv),
        **{key: value for key, value in vars(args).items() if key not in ("device", "probe", "json", "params_table")},
    }
    print(
        f"Device: {settings['device']}; torch {settings['torch']}; {settings['date']}; encoder {args.encoder}, "
        f"width {args.width}, deep supervision {args.deep_supervision}, CGM {args.cgm}; batch {args.batch}, "
        f"{args.size}x{args.size}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{'channels_last' if args.channels_last else 'contiguous'}{', torch.compile' if args.compile else ''}; "
        f"medians of {args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up.\n"
    )
    print(table(results, args))
    payload = {"settings": settings, "results": results}
    if args.json:
        write_json_atomic(args.json, payload)
    return payload


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    columns = [("params (M)", "params_m", "{:.2f}")]
    if args.flops:
        columns.append((f"GFLOPs/img fwd @{FLOP_SIZE}", f"gflops_fwd_{FLOP_SIZE}", "{:.1f}"))
    for mode in args.modes:
        columns.append((f"{mode} img/s", f"{mode}_img_s", "{:.2f}"))
        columns.append((f"{mode} speed-up vs naive", f"{mode}_speedup_vs_naive", "{:.2f}x"))
        if args.device == "cpu":
            columns.append((f"{mode} CPU-time speed-up", f"{mode}_cpu_time_speedup_vs_naive", "{:.2f}x"))
        if args.memory:
            columns.append((f"{mode} peak MiB", f"{mode}_peak_mib", "{:.0f}"))
    lines = ["| model | " + " | ".join(title for title, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        cells = [fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
