"""Epoch time of the default ``dvc repro`` training, naive vs factored/auto UNet 3+ skips, side by side.

Builds the liver data the way ``dvc repro`` does with ``params.yaml`` (synthetic LiTS phantom,
preprocessed at ``data.size``) in a temporary folder, then times whole training epochs of the
configured model (``model`` section: UNet 3+ width 8, deep supervision, CGM), hybrid loss,
optimiser and DataLoader (``train`` section: batch 8, 2 workers, augmentation, organ
oversampling) with ``model.skip_impl`` set to each value in turn, the epochs interleaved
(naive, auto, factored, naive, ...) so that load from other processes hits all alike. Both
models start from the same weights. Validation and checkpoint writing, which do not depend on
``skip_impl``, are left out. Prints the median epoch seconds and the speed-up over naive.

    python benchmarks/bench_train_epoch.py --params params.yaml --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from unet3plus.config import load_config
from unet3plus.data.dataset import SliceDataset
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.device import autocast_context
from unet3plus.losses import Criterion
from unet3plus.models import create_model
from unet3plus.train import EpochSampler, make_optimizer, train_one_epoch
from unet3plus.utils import write_json_atomic

IMPLS = ("naive", "auto", "factored")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the configuration (default params.yaml)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved epochs per skip_impl (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = load_config(args.params)
    data, train_config = config.data, config.train
    with tempfile.TemporaryDirectory() as scratch:
        raw, processed = Path(scratch) / "raw", Path(scratch) / "processed"
        write_dataset("lits", raw, cases=data.synth_cases, seed=data.synth_seed, size=data.synth_size,
                      slices=data.synth_slices)
        preprocess_dataset("lits", raw, processed, data)
        dataset = SliceDataset(processed, "train", augment=train_config.augment, seed=train_config.seed)
        sampler = EpochSampler(dataset.organ_present, train_config.organ_fraction, train_config.seed)
        loader = DataLoader(dataset, batch_size=train_config.batch_size, sampler=sampler,
                            num_workers=train_config.num_workers)
        runs = {}
        for impl in IMPLS:
            torch.manual_seed(train_config.seed)
            model = create_model(**{**vars(config.model), "skip_impl": impl})
            optimizer = make_optimizer(model.parameters(), train_config)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            runs[impl] = (model, optimizer, scheduler)
        criterion = Criterion(**vars(config.loss))
        device = torch.device("cpu")
        seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
        for epoch in range(args.rounds):
            sampler.set_epoch(epoch)
            for impl, (model, optimizer, scheduler) in runs.items():
                start = time.perf_counter()
                train_one_epoch(model, loader, criterion, optimizer, scheduler, device,
                                autocast_context(device, train_config.mixed_precision))
                seconds[impl].append(time.perf_counter() - start)
                print(f"epoch {epoch} {impl}: {seconds[impl][-1]:.1f} s", file=sys.stderr, flush=True)
        steps = len(loader)
    median = {impl: statistics.median(times) for impl, times in seconds.items()}
    speedup = {
        impl: statistics.median(base / own for base, own in zip(seconds["naive"], times))
        for impl, times in seconds.items()
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.params}: UNet 3+ width {config.model.width}, "
          f"{data.size}x{data.size}, batch {train_config.batch_size}, {steps} steps per epoch; "
          f"medians of {args.rounds} interleaved epochs\n")
    print("| model.skip_impl | epoch s (median) | speed-up vs naive |\n|---|---|---|")
    for impl in IMPLS:
        print(f"| {impl} | {median[impl]:.1f} | {speedup[impl]:.2f}x |")
    if args.json:
        write_json_atomic(args.json, {"seconds": seconds, "median": median, "speedup": speedup, "steps": steps,
                                      "params": args.params, "torch": torch.__version__})


if __name__ == "__main__":
    main()
