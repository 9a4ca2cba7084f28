"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2`` (CPU, gloo); writes its findings as JSON.

Uses the training code's own pieces (``distributed_model``, ``train_one_epoch``, ``Criterion``,
``create_model``) on random batches:

1. gradient sync: after 3 DDP steps every rank's parameters, gathered, are bitwise equal;
2. data parallel = large batch: 2 processes x batch B give the same parameters as 1 process x
   batch 2B (BatchNorm and the CGM's dropout in eval mode: on CPU there is no SyncBatchNorm, so
   per-process batch statistics differ by design, and dropout masks are random per process);
3. a parameter without gradient (the CGM with ``loss.cgm_weight=0``) neither deadlocks nor crashes.
"""

import contextlib
import copy
import dataclasses
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from unet3plus.config import load_config
from unet3plus.losses import Criterion
from unet3plus.models import create_model
from unet3plus.train import distributed_model, make_optimizer, train_one_epoch

B, SIZE, STEPS = 2, 32, 3


def batches(rank: int, world_size: int, batch_size: int) -> list[dict]:
    """STEPS global batches of ``B * 2`` samples (same on every rank); this rank's slice of each."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        image = torch.randn(2 * B, 3, SIZE, SIZE, generator=generator)
        mask = (torch.rand(2 * B, 1, SIZE, SIZE, generator=generator) > 0.7).float()
        part = slice(rank * batch_size, (rank + 1) * batch_size)
        out.append({"image": image[part], "mask": mask[part], "organ_present": mask[part].flatten(1).amax(1)})
    return out


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def frozen_batchnorm_step(model, data, criterion, optimizer):
    for batch in data:
        model.train()
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                module.eval()
        loss = criterion(model(batch["image"]), batch["mask"], batch["organ_present"])["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    config = load_config(None, ["model.width=4", "model.deep_supervision=true", "model.cgm=true",
                                "train.optimizer=sgd", "train.lr=0.1"])
    findings = {}

    # 1. gradient sync, through the real train_one_epoch (BatchNorm in training mode).
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = create_model(**dataclasses.asdict(config.model))
    ddp = distributed_model(model, config, device, 0)
    initial = flat(model)  # rank 0's weights, broadcast when DDP wrapped the model
    optimizer = make_optimizer(model.parameters(), config.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(ddp, batches(rank, world_size, B), Criterion(**dataclasses.asdict(config.loss)), optimizer,
                    scheduler, device, contextlib.nullcontext())  # each rank its own half of every batch
    gathered = [torch.empty_like(flat(model)) for _ in range(world_size)]
    dist.all_gather(gathered, flat(model))
    findings["bitwise_equal"] = all(torch.equal(gathered[0], other) for other in gathered[1:])
    findings["moved"] = float((gathered[0] - initial).abs().max())

    # 2. 2 processes x B == 1 process x 2B (BatchNorm frozen), same initial weights everywhere.
    torch.manual_seed(0)
    reference = create_model(**dataclasses.asdict(config.model))
    criterion = Criterion(**dataclasses.asdict(config.loss))
    single = copy.deepcopy(reference)
    ddp = distributed_model(copy.deepcopy(reference), config, device, 0)
    frozen_batchnorm_step(ddp, batches(rank, world_size, B), criterion, make_optimizer(ddp.parameters(), config.train))
    if rank == 0:
        frozen_batchnorm_step(single, batches(0, 1, 2 * B), criterion,
                              make_optimizer(single.parameters(), config.train))
        difference = (flat(ddp.module) - flat(single)).abs()
        findings["max_difference"] = float(difference.max())
        findings["max_update"] = float((flat(single) - flat(reference)).abs().max())

    # 3. the CGM without loss weight: parameters without gradient, 3 steps must complete.
    no_cgm_loss = dataclasses.replace(config, loss=dataclasses.replace(config.loss, cgm_weight=0.0))
    model = create_model(**dataclasses.asdict(no_cgm_loss.model))
    ddp = distributed_model(model, no_cgm_loss, device, 0)
    optimizer = make_optimizer(model.parameters(), no_cgm_loss.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    losses = train_one_epoch(ddp, batches(rank, world_size, B), Criterion(**dataclasses.asdict(no_cgm_loss.loss)),
                             optimizer, scheduler, device, contextlib.nullcontext())
    findings["unused_parameters_loss"] = losses["loss"]
    findings["find_unused_parameters"] = ddp.find_unused_parameters

    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(findings, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
