"""Training: one function, :func:`train`, that reads top to bottom in the order it runs.

Layout after nanoGPT's ``train.py``: check the data, set up (distributed from the environment,
device, precision, seeds), build loaders, model, loss, optimiser and schedule, restore a
checkpoint when resuming, then loop over epochs: train, validate (3-D Dice per volume), record,
checkpoint, track. Run under ``torchrun`` for distributed data parallel training; only the
master process (rank 0) validates, writes files and talks to MLflow.

Outputs in ``out_dir`` (all written atomically):

- ``last.pt``: the complete training state after every epoch (model, optimiser, scheduler,
  epoch, best metric, history, config, dataset, RNG states of every rank, MLflow run id);
  ``train(..., resume=True)`` continues from it exactly.
- ``best.pt``: the checkpoint that evaluate and register use, a copy of ``last.pt`` from the epoch
  with the best validation Dice (``train.select_checkpoint: val_dice``) or from the final epoch
  (``last_epoch``; then ``best_val_dice`` and ``best_epoch`` describe the final epoch).
- ``history.csv``: one row per epoch (epoch, lr, loss and its parts, val_dice, seconds).
- ``curves.png``: the learning curves; ``train_summary.json``: see :func:`train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from unet3plus import tracking
from unet3plus.checkpoint import load_checkpoint, save_checkpoint
from unet3plus.config import MAIN, Config, LossConfig, TrainConfig, config_from_dict
from unet3plus.data.dataset import SliceDataset, load_preprocessed
from unet3plus.device import autocast_context, describe_device, memory_format_for, prepare_model, select_device
from unet3plus.errors import CheckpointError, ConfigError, DataError, TrainingError, UserError
from unet3plus.losses import Criterion
from unet3plus.metrics import dice
from unet3plus.models import create_model, predict_proba
from unet3plus.utils import atomic_path, check_replaceable, folder_lock, record_outputs, write_json_atomic

logger = logging.getLogger(__name__)

VAL_THRESHOLD = 0.5  # probability above which a pixel counts as organ in the validation Dice


def train(
    config: Config, data_dir: str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False,
    force: bool = False, compile_model: bool = False, ablation: str = MAIN, base: Config | None = None,
) -> dict[str, Any]:
    """Train the model of ``config`` on a preprocessed dataset and track the run in MLflow.

    Args:
        config: the validated configuration; the ``model``, ``loss``, ``train`` and ``mlflow``
            sections are used.
        data_dir: a directory written by :func:`unet3plus.data.preprocess.preprocess_dataset`.
        out_dir: where checkpoints, history and summary go (created).
        resume: continue from ``out_dir/last.pt`` (same model, train and loss settings, except
            :data:`RESUME_MAY_CHANGE`, and dataset) up to
            ``config.train.epochs``, and continue its MLflow run when the store still has it;
            metrics the run missed while tracking was unavailable are logged then. The dataset
            must be the one ``last.pt`` was trained on (same data hash).
        force: start afresh even if ``out_dir`` holds an earlier run or files training did not
            write (they are replaced). Without it such an ``out_dir`` is refused.
        ablation: the variant's name (``ablations.variants``), tagged ``ablation`` on the run;
            ``main`` for the main model.
        base: the configuration the variant was derived from (default ``config``): the run is a
            child of the parent run of the study (dataset, data hash, ``base``'s parameters).

    Returns:
        On the master process, the summary also written to ``out_dir/train_summary.json``:
        ``{"dataset", "mlflow_run_id", "mlflow_offline", "best_val_dice", "best_epoch",
        "epochs"}`` (``mlflow_offline`` is true when tracking failed and some results exist only
        locally; ``epochs`` counts completed epochs). An empty dict on other ranks.

    Raises:
        DataError: ``data_dir`` is missing or corrupt, or its train or val split is empty.
        CheckpointError: resuming from a missing, corrupt or incompatible ``last.pt``.
        UserError: ``out_dir`` holds an earlier run or foreign files (without ``resume``/``force``).
        TrainingError: the loss or the weights became NaN or infinite (nothing of that epoch is saved).
    """
    try:
        # One writer per --out for the whole run (rank 0 writes alone): a second training into it is refused.
        lock = folder_lock(out_dir, "a training") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        with lock:
            return _train(config, Path(data_dir), Path(out_dir), resume, force, compile_model, ablation, base)
    except Exception as err:
        # A refusal (bad setting, data, checkpoint or output folder) writes nothing, the tracking
        # store included; failures once training runs end as a FAILED run (see tracking.open_run).
        # An unexpected failure before the MLflow run started (e.g. out of memory while building
        # the model), and a variant whose own settings cannot train (e.g. its encoder_weights file
        # is missing), still leave a FAILED run with the error, so the report and the UI show it.
        refusal = isinstance(err, UserError) and not (ablation != MAIN and isinstance(err, ConfigError))
        if not refusal and ("RANK" not in os.environ or os.environ["RANK"] == "0"):
            recorded = hasattr(err, "mlflow_run_id")
            readable = all((Path(data_dir) / name).is_file() for name in ("cases.json", "manifest.csv"))
            if not recorded and not resume and readable:
                dataset_name = json.loads((Path(data_dir) / "cases.json").read_text()).get("dataset", "unknown")
                tracking.record_failure(config.mlflow, error=err, **_run_identity(
                    config, base, Path(data_dir), dataset_name, ablation, new=True,
                    device="unknown (the run failed before training started)"))
        raise


def _run_identity(config: Config, base: Config | None, data_dir: Path, dataset: str, ablation: str,
                  new: bool, device: str = "") -> dict[str, Any]:
    """Name, tags, params and study parent of a training run (the parent only for a ``new`` run).

    ``device`` (:func:`describe_device`; ``""`` before one was chosen) is a param of a new run and
    the ``device`` tag of every start, so a run resumed elsewhere says where it ended.
    """
    parent = None
    if new:
        parent = tracking.study_parent(config.mlflow, dataset, tracking.data_hash(data_dir), base or config)
    on = {"device": device} if device else {}
    return {"run_name": tracking.run_name(config, dataset), "params": {**config.flat(), **on},
            "parent_run_id": parent,
            "tags": {**tracking.run_tags(data_dir, dataset), "ablation": ablation, **on}}


def _train(config: Config, data_dir: Path, out_dir: Path, resume: bool, force: bool, compile_model: bool,
           ablation: str, base: Config | None) -> dict[str, Any]:
    train_config = config.train

    # -- check inputs before anything is written -------------------------------------------------
    manifest, cases = load_preprocessed(data_dir)
    dataset_name = cases["dataset"]
    # Record how data_dir was really made, not what params.yaml says now: predict and register
    # repeat this preprocessing on new scans from the checkpoint's data section.
    config = dataclasses.replace(config, data=config_from_dict({"data": cases["data_config"]}).data)
    if base is not None:  # the study is keyed on the same real data section, whatever the entry point
        base = dataclasses.replace(base, data=config.data)
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise DataError(
                f"{data_dir / 'manifest.csv'}: the {split!r} split has no samples; "
                "preprocess more cases or change data.val_fraction"
            )
    weights = config.model.encoder_weights
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.encoder_weights = {weights!r}: file not found")
    fingerprint = tracking.data_hash(data_dir)
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(out_dir / "last.pt")
        allowed_changes = _check_resumable(checkpoint, config, dataset_name, out_dir / "last.pt", fingerprint)
        summary_path = out_dir / "train_summary.json"
        done = checkpoint["epoch"] >= train_config.epochs
        summary = json.loads(summary_path.read_text()) if done and summary_path.is_file() else {}
        # A run that ended offline still has history to upload: go on (no epoch left) to log it.
        if done and not summary.get("mlflow_offline"):
            logger.info("%s: all %d epochs are already done (train.epochs = %d); nothing to do. Raise train.epochs "
                        "to train longer.", out_dir / "last.pt", checkpoint["epoch"], train_config.epochs)
            return summary
    elif not force:
        _check_fresh_out_dir(out_dir)

    # -- setup: distributed (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), device, precision, seeds
    ddp = "RANK" in os.environ
    rank, world_size, local_rank = 0, 1, 0
    device = select_device(train_config.device, "train.device")
    if ddp:
        rank, world_size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    device_name = describe_device(device)
    if master:
        logger.info("training on %s", device_name)
    _seed_everything(train_config.seed + rank)
    autocast = autocast_context(device, train_config.mixed_precision)
    memory_format = memory_format_for(device, train_config.mixed_precision)

    try:
        # -- data ---------------------------------------------------------------------------------
        train_set = SliceDataset(data_dir, "train", augment=train_config.augment, seed=train_config.seed)
        # The order is a function of (seed, epoch), not of how far the previous epoch's sampler was
        # consumed (max_steps_per_epoch, worker prefetch), so a resumed run shuffles identically.
        sampler = EpochSampler(train_set.organ_present, train_config.organ_fraction, train_config.seed, rank, world_size)
        generator = torch.Generator().manual_seed(train_config.seed + rank)  # seeds the loader's workers
        train_loader = DataLoader(
            train_set,
            batch_size=train_config.batch_size,
            sampler=sampler,
            num_workers=train_config.num_workers,
            worker_init_fn=_seed_worker,
            generator=generator,
            pin_memory=device.type == "cuda",
        )
        val_set = SliceDataset(data_dir, "val")
        val_loader = DataLoader(val_set, batch_size=train_config.batch_size, num_workers=train_config.num_workers)
        steps_per_epoch = min(len(train_loader), train_config.max_steps_per_epoch or len(train_loader))

        # -- model, loss, optimiser, schedule ---------------------------------------------------------
        raw_model = prepare_model(create_model(**dataclasses.asdict(config.model)), device, train_config.mixed_precision)
        model = raw_model
        if ddp:
            model = distributed_model(raw_model, config, device, local_rank)
            raw_model = model.module  # with SyncBatchNorm on GPUs
        if compile_model:
            model = torch.compile(model)
        criterion = Criterion(**dataclasses.asdict(config.loss))
        optimizer = make_optimizer(raw_model.parameters(), train_config, fused=device.type == "cuda")
        multiplier = functools.partial(
            lr_multiplier, train_config, total_steps=train_config.epochs * steps_per_epoch,
            warmup_steps=round(train_config.warmup_epochs * steps_per_epoch),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

        # -- resume -----------------------------------------------------------------------------------
        start_epoch, best_val_dice, best_epoch, history, run_id = 0, None, None, [], None
        if checkpoint is not None:
            raw_model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            start_epoch, history = checkpoint["epoch"], checkpoint["history"]
            best_val_dice, best_epoch = checkpoint["best_metric"], checkpoint["best_epoch"]
            run_id = checkpoint["mlflow_run_id"]
            _restore_rng(checkpoint["rng"], rank, generator, train_config.seed + rank + start_epoch)
            logger.info("resuming from %s after epoch %d", out_dir / "last.pt", start_epoch)

        # -- tracking: one MLflow run, on the master only ---------------------------------------------
        with tracking.open_run(
            config.mlflow,
            run_id=run_id,
            enabled=master,
            **_run_identity(config, base, data_dir, dataset_name, ablation, new=master and run_id is None,
                            device=device_name),
        ) as run:
            run.log_text(_config_yaml(config), "config.yaml")
            if checkpoint is not None and allowed_changes:  # MLflow params are immutable: the change is a tag
                logger.info("resumed with %s", ", ".join(allowed_changes))
                run.set_tags({"resumed_with": ", ".join(allowed_changes)})
            if not run.resumed:
                tracking.log_datasets(run, data_dir, dataset_name, manifest)
            logged_epochs = _log_history(run, history, run.last_step("val_dice"))

            # -- the loop ---------------------------------------------------------------------------
            for epoch in range(start_epoch + 1, train_config.epochs + 1):
                started = time.perf_counter()
                train_set.set_epoch(epoch)  # augmentations are drawn from (seed, epoch, index)
                sampler.set_epoch(epoch)
                lr = scheduler.get_last_lr()[0]
                batches = itertools.islice(train_loader, steps_per_epoch)
                progress = tqdm(
                    batches, desc=f"epoch {epoch}/{train_config.epochs}", total=steps_per_epoch, leave=False,
                    disable=None if master else True,  # None: shown only on a terminal
                )
                losses = train_one_epoch(
                    model, progress, criterion, optimizer, scheduler, device, autocast, memory_format
                )
                _check_finite_weights(raw_model, epoch)
                val_dice = validation_dice(raw_model, val_loader, device, autocast, memory_format) if master else None
                rng = _gather_rng(generator, ddp, world_size)  # after validation, whose loader draws a seed
                if master:
                    improved = (train_config.select_checkpoint == "last_epoch" or best_val_dice is None
                                or val_dice > best_val_dice)
                    if improved:
                        best_val_dice, best_epoch = val_dice, epoch
                    seconds = time.perf_counter() - started
                    history.append({"epoch": epoch, "lr": lr, **losses, "val_dice": val_dice, "seconds": seconds})
                    _write_history(history, out_dir / "history.csv")
                    logged_epochs = _log_history(run, history, logged_epochs)
                    save_checkpoint(
                        out_dir / "last.pt",
                        {
                            "model": raw_model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "epoch": epoch,
                            "best_metric": best_val_dice,
                            "best_epoch": best_epoch,
                            "history": history,
                            "config": config.to_dict(),
                            "dataset": dataset_name,
                            "rng": rng,
                            "mlflow_run_id": run.run_id,
                            "data_hash": fingerprint,
                        },
                    )
                    if improved:
                        with atomic_path(out_dir / "best.pt") as tmp:
                            shutil.copyfile(out_dir / "last.pt", tmp)
                    record_outputs(out_dir, [out_dir / name for name in ("history.csv", "last.pt", "best.pt")])
                    summary_line = _epoch_summary(history[-1], best_val_dice, best_epoch)
                    logger.info("epoch %d/%d: %s", epoch, train_config.epochs, summary_line)
                if ddp:
                    dist.barrier()  # the other ranks wait here while the master writes

            # -- the end: summary, curves, artifacts --------------------------------------------------
            if not master:
                return {}
            _plot_curves(history, out_dir / "curves.png")
            for artifact in ("history.csv", "curves.png"):
                run.log_artifact(out_dir / artifact)
            summary = {
                "dataset": dataset_name,
                "mlflow_run_id": run.run_id,
                "mlflow_offline": run.offline,
                "best_val_dice": best_val_dice,
                "best_epoch": best_epoch,
                "epochs": len(history),
                "device": device_name,
            }
            write_json_atomic(out_dir / "train_summary.json", summary)
            record_outputs(out_dir, [out_dir / name for name in ("curves.png", "train_summary.json")])
            run.log_artifact(out_dir / "train_summary.json")
            if run.offline:
                logger.warning(
                    "MLflow was unavailable; results are complete in %s (history.csv, checkpoints). Run `unet3plus "
                    "train --resume` with the same --out when the server is back to log them.",
                    out_dir,
                )
        logger.info("best val Dice %.4f at epoch %d; checkpoints in %s", best_val_dice, best_epoch, out_dir)
        return summary
    finally:
        if ddp:
            dist.destroy_process_group()


class EpochSampler(Sampler[int]):
    """This process's share of one epoch's slice order, a pure function of (seed, epoch, rank).

    Every epoch has ``len(organ_present)`` draws, split over ``world_size`` processes like
    ``DistributedSampler`` (the order is padded to a multiple of ``world_size``). With
    ``organ_fraction`` above the data's natural share of organ slices, that fraction of the draws
    are slices containing the organ (repeated as needed) and the rest organ-free slices: small
    organs such as the spleen otherwise sit in an all-background plateau for many epochs
    (nnU-Net oversamples foreground for the same reason). Below the natural share the epoch is a
    plain permutation.

    Args:
        organ_present: per slice, 1.0 when it contains the organ; shape (N,).
        organ_fraction: minimum share of organ slices per epoch, in [0, 1).
        seed, rank, world_size: the order depends on seed and epoch; rank picks the shard.
    """

    def __init__(self, organ_present: np.ndarray, organ_fraction: float, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.organ = np.flatnonzero(organ_present > 0)
        self.free = np.flatnonzero(organ_present <= 0)
        self.size = len(organ_present)
        self.organ_draws = round(organ_fraction * self.size) if len(self.organ) and len(self.free) else 0
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def epoch_order(self) -> np.ndarray:
        """The whole epoch's order, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.organ_draws <= len(self.organ):
            order = rng.permutation(self.size)
        else:
            organ = np.resize(rng.permutation(self.organ), self.organ_draws)
            free = rng.permutation(self.free)[: self.size - self.organ_draws]
            order = rng.permutation(np.concatenate([organ, free]))
        return np.resize(order, len(self) * self.world_size)

    def __iter__(self):
        return iter(self.epoch_order()[self.rank :: self.world_size].tolist())


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """One pass of optimisation over ``batches``, stepping the schedule after every batch.

    Args:
        model: the network (possibly DDP-wrapped), returning a ``SegmentationOutput``.
        batches: items of :class:`SliceDataset` collated: ``image`` (B, 3, S, S), ``mask``
            (B, 1, S, S), ``organ_present`` (B,).
        criterion, optimizer, scheduler: as built by :func:`train`.
        device, autocast, memory_format: where and in which precision/layout to compute.

    Returns:
        ``{"loss": mean total loss, "loss_<part>": mean of each part}`` over the batches; under
        DDP the means are over all ranks.
    """
    model.train()
    sums: dict[str, float] = defaultdict(float)
    batch_count = 0
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
        mask = batch["mask"].to(device, non_blocking=True)
        organ_present = batch["organ_present"].to(device, non_blocking=True)
        with autocast:
            output = model(image)
        losses = criterion(output, mask, organ_present)  # the criterion runs in float32 itself
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        scheduler.step()
        for name, value in losses.items():
            sums[name] += value.item()
        if not math.isfinite(sums["total"]):
            raise TrainingError(
                f"the training loss became {losses['total'].item()} at step {batch_count + 1} of this epoch; "
                "stopped without saving it. Lower train.lr, or check the data and loss weights"
            )
        batch_count += 1
        if isinstance(batches, tqdm):
            batches.set_postfix(loss=f"{losses['total'].item():.4f}")
    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names] + [batch_count], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    means = {name: (totals[i] / totals[-1]).item() for i, name in enumerate(names)}
    return {"loss": means.pop("total"), **{f"loss_{name}": value for name, value in means.items()}}


@torch.no_grad()
def validation_dice(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    memory_format: torch.memory_format = torch.contiguous_format,
    threshold: float = VAL_THRESHOLD,
) -> float:
    """Mean per-volume 3-D Dice on the preprocessed grid.

    Every slice is predicted with :func:`unet3plus.models.predict_proba` (CGM gate applied) and
    thresholded; the slices of each case are stacked in ``slice_index`` order and scored with
    :func:`unet3plus.metrics.dice` against the stacked masks.

    Args:
        model: the unwrapped network.
        loader: a loader over :class:`SliceDataset` items (any order).
        device, autocast, memory_format: as in :func:`train_one_epoch`.
        threshold: probability above which a pixel is organ.

    Returns:
        The mean over cases of the volume Dice, in [0, 1].
    """
    model.eval()
    predicted: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    target: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for batch in loader:
        with autocast:
            probability = predict_proba(model, batch["image"].to(device, memory_format=memory_format))
        masks = (probability > threshold).cpu().numpy()
        truths = batch["mask"].numpy() > 0.5
        for case_id, index, mask, truth in zip(batch["case_id"], batch["slice_index"].tolist(), masks, truths):
            predicted[case_id][index] = mask
            target[case_id][index] = truth
    model.train()
    scores = [dice(_stack(predicted[case_id]), _stack(target[case_id])) for case_id in sorted(predicted)]
    return float(np.mean(scores))


def parameters_may_go_unused(config: Config) -> bool:
    """Whether some parameters of ``config``'s model get no gradient (the CGM when its loss weight is 0).

    DDP must then be told (``find_unused_parameters``) or its gradient reduction waits forever
    for them; otherwise the flag only costs a graph traversal per step, so it is set only here.
    """
    return config.model.cgm and config.loss.cgm_weight == 0


def distributed_model(model: nn.Module, config: Config, device: torch.device, local_rank: int) -> nn.Module:
    """``model`` wrapped for DDP (the process group is initialised).

    On GPUs BatchNorm becomes ``SyncBatchNorm``, so N processes x batch B normalise like one
    process x batch N*B. On CPU (gloo) PyTorch has no ``SyncBatchNorm``: each process normalises
    its own batch, as data parallel CPU training usually does.
    """
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None,
        find_unused_parameters=parameters_may_go_unused(config),
    )


def make_optimizer(
    parameters: Iterable[nn.Parameter], train_config: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's optimiser) or AdamW, as ``train_config.optimizer`` says.

    ``fused`` (used on CUDA) updates all parameters in one kernel instead of a few per tensor.
    """
    options = {"fused": True} if fused else {}
    if train_config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=train_config.lr, momentum=train_config.momentum, weight_decay=train_config.weight_decay,
            **options,
        )
    return torch.optim.AdamW(parameters, lr=train_config.lr, weight_decay=train_config.weight_decay, **options)


def lr_multiplier(train_config: TrainConfig, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Factor applied to the base learning rate at optimisation ``step`` (0-based).

    A linear warm-up first: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, so
    the first update is already non-zero and the factor reaches 1 at ``warmup_steps``. Then the
    schedule over the remaining steps, with ``progress = (step - warmup_steps) / (total_steps -
    warmup_steps)``: ``poly``: ``(1 - progress) ** poly_power``; ``cosine``:
    ``(1 + cos(pi * progress)) / 2``; ``constant``: 1. Past ``total_steps`` (a resume with fewer
    epochs) the factor stays at its final value.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if train_config.schedule == "poly":
        return (1.0 - progress) ** train_config.poly_power
    if train_config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _stack(slices: dict[int, np.ndarray]) -> np.ndarray:
    return np.stack([slices[index] for index in sorted(slices)])


def _check_fresh_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` holding an earlier run, or files of ours changed by someone, or foreign files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: --out is a file, not a folder; choose another --out")
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).exists():
            raise UserError(
                f"{out_dir / name}: {out_dir} holds an earlier training run; continue it with --resume, "
                "replace it with --force, or train into another --out"
            )
    outputs = [out_dir / name for name in ("history.csv", "curves.png", "train_summary.json")]
    check_replaceable(out_dir, outputs, "use another --out, or --force")


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop before a checkpoint with NaN or infinite weights can be written."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise TrainingError(
            f"weights became NaN or infinite in epoch {epoch} ({', '.join(bad[:3])}); stopped without saving them. "
            "Lower train.lr"
        )


RESUME_MAY_CHANGE = ("train.epochs", "train.device", "train.num_workers")
"""What ``--resume`` may change: train longer, on another machine. Every other train.* or loss.* change is refused
(the optimiser state, the schedule and the MLflow params were made with the old values)."""


def resume_changes(saved: dict[str, Any], config: Config) -> list[str]:
    """``section.key (old -> new)`` for each train.* and loss.* setting of ``config`` that differs from ``saved``.

    ``saved`` is a checkpoint's config; a key it lacks (an older checkpoint) had the default value.
    """
    changes = []
    for section, defaults in (("train", TrainConfig()), ("loss", LossConfig())):
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            old = saved.get(section, {}).get(key, getattr(defaults, key))
            if old != value:
                changes.append(f"{section}.{key} ({old!r} -> {value!r})")
    return changes


def _check_resumable(checkpoint: dict[str, Any], config: Config, dataset_name: str, path: Path,
                     fingerprint: str) -> list[str]:
    """Refuse a checkpoint that cannot continue as ``config`` says; returns the changes it may take (resume_changes)."""
    missing = [key for key in ("optimizer", "scheduler", "rng", "history", "best_epoch") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (lacks {', '.join(missing)}); cannot resume from it")
    # skip_impl only chooses how forward computes the same function; checkpoints written before
    # the key existed lack it.
    def network(model: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in model.items() if key != "skip_impl"}

    if network(checkpoint["config"]["model"]) != network(config.to_dict()["model"]):
        raise CheckpointError(
            f"{path}: was trained with model {checkpoint['config']['model']}, but the configuration asks for "
            f"{config.to_dict()['model']}; resume with the same model section or train into a new output directory"
        )
    changed = resume_changes(checkpoint["config"], config)
    refused = [change for change in changed if change.partition(" ")[0] not in RESUME_MAY_CHANGE]
    if refused:
        raise CheckpointError(
            f"{path}: --resume with settings other than the checkpoint's: {', '.join(refused)}; a resumed run "
            "continues with the settings it started with: restore them, or train into a new --out (or --force)"
        )
    if checkpoint["dataset"] != dataset_name:
        raise CheckpointError(
            f"{path}: was trained on {checkpoint['dataset']!r} data, not {dataset_name!r}; "
            "train into a new output directory"
        )
    if checkpoint.get("data_hash", fingerprint) != fingerprint:
        raise CheckpointError(
            f"{path}: was trained on other data (data hash {checkpoint['data_hash']}, this --data has {fingerprint}); "
            "resume only on the same preprocessed data, or train into a new output directory"
        )
    return changed


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch and random in each worker from its generator; numpy is left to us.
    np.random.seed(torch.initial_seed() % 2**32)


def _gather_rng(generator: torch.Generator, ddp: bool, world_size: int) -> list[dict[str, Any]]:
    """The RNG states of every rank (index = rank), taken at the end of an epoch."""
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "loader": generator.get_state(),
    }
    if not ddp:
        return [state]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def _restore_rng(states: list[dict[str, Any]], rank: int, generator: torch.Generator, fallback_seed: int) -> None:
    if rank >= len(states):
        logger.warning("checkpoint has RNG states of %d process(es), none for rank %d; reseeding", len(states), rank)
        _seed_everything(fallback_seed)
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["loader"])


def _log_history(run: tracking.TrackedRun, history: list[dict[str, float]], logged_epochs: int) -> int:
    """Log the history rows MLflow has not seen (epochs after ``logged_epochs``); returns the new count."""
    for row in history[logged_epochs:]:
        run.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])
    return len(history)


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def _config_yaml(config: Config) -> str:
    # JSON round trip: tuples become lists, which safe_dump accepts.
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)


def _epoch_summary(row: dict[str, float], best_val_dice: float, best_epoch: int) -> str:
    parts = ", ".join(f"{key[5:]} {value:.4f}" for key, value in row.items() if key.startswith("loss_"))
    return (
        f"loss {row['loss']:.4f} ({parts}), val Dice {row['val_dice']:.4f} "
        f"(best {best_val_dice:.4f} at epoch {best_epoch}), lr {row['lr']:.2e}, {row['seconds']:.1f} s"
    )


def _plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Training losses and validation Dice against the epoch, side by side, as a PNG."""
    table = pd.DataFrame(history)
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, dice_axes = figure.subplots(1, 2)
    for column in [c for c in table.columns if c.startswith("loss")]:
        loss_axes.plot(table["epoch"], table[column], marker="o", label=column)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="training loss")
    loss_axes.legend()
    dice_axes.plot(table["epoch"], table["val_dice"], marker="o", color="tab:green")
    dice_axes.set(xlabel="epoch", ylabel="Dice", title="validation Dice per volume", ylim=(0, 1))
    for axes in (loss_axes, dice_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100)
