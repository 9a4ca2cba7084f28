"""Distributed training proven, not only run: gradient sync, sharding, large-batch equivalence, unused parameters."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_params
from unet3plus.config import load_config
from unet3plus.losses import Criterion
from unet3plus.models import create_model
from unet3plus.train import EpochSampler, parameters_may_go_unused

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_stay_bitwise_equal_match_one_large_batch_and_survive_unused_parameters(tmp_path):
    """tests/ddp_worker.py under torchrun, 2 CPU processes (gloo); see its docstring for the three checks."""
    out = tmp_path / "findings.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # A deadlock would end in the timeout.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    findings = json.loads(out.read_text())
    # 1. Different initial weights and different data per rank, yet after 3 steps identical bits.
    assert findings["bitwise_equal"] is True and findings["moved"] > 1e-3
    # 2. 2 x B against 1 x 2B: the same up to float32 summation order, far below one update.
    assert findings["max_difference"] < 1e-4 < findings["max_update"]
    # 3. The CGM without its loss: DDP told so, and 3 steps completed on both ranks.
    assert findings["find_unused_parameters"] is True and np.isfinite(findings["unused_parameters_loss"])


def _configs():
    for arch, deep, cgm, cgm_weight in itertools.product(("unet", "unet2plus", "unet3plus"), (False, True),
                                                         (False, True), (0.0, 1.0)):
        config = load_config(None, ["model.width=4", f"model.arch={arch}", f"model.deep_supervision={deep}",
                                    f"model.cgm={cgm}"])
        # dataclasses.replace, not an override: params validation may refuse cgm without its loss.
        yield dataclasses.replace(config, loss=dataclasses.replace(config.loss, cgm_weight=cgm_weight))


def test_ddp_is_told_about_unused_parameters_exactly_when_a_configuration_has_some():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    for config in _configs():
        model = create_model(**dataclasses.asdict(config.model))
        Criterion(**dataclasses.asdict(config.loss))(model(image), mask, torch.tensor([1.0, 0.0]))["total"].backward()
        without_gradient = [name for name, p in model.named_parameters() if p.grad is None]
        assert bool(without_gradient) == parameters_may_go_unused(config), (config.model, without_gradient)


@pytest.mark.parametrize("size, organ_fraction", [(12, 0.0), (11, 0.0), (60, 0.5), (37, 0.5)])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_the_ranks_shards_are_disjoint_and_cover_the_epoch(size, organ_fraction, world_size):
    organ = (np.arange(size) % 5 == 0).astype(np.float32)
    for epoch in (1, 2):
        samplers = [EpochSampler(organ, organ_fraction, seed=3, rank=rank, world_size=world_size)
                    for rank in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        order = samplers[0].epoch_order()[:size].tolist()  # the epoch's draws, before padding
        padding = len(shards[0]) * world_size - size
        # Equal lengths (DDP steps in lockstep); the shards together are the epoch's draws exactly,
        # plus fewer than world_size padding draws repeated from its start (as DistributedSampler).
        assert len({len(shard) for shard in shards}) == 1 and 0 <= padding < world_size
        assert Counter(itertools.chain(*shards)) == Counter(order + order[:padding])
        if organ_fraction == 0.0:
            assert sorted(order) == list(range(size))  # a plain permutation of the slices
            if padding == 0:  # then no slice is on two ranks
                assert all(not set(a) & set(b) for a, b in itertools.combinations(shards, 2))


@pytest.mark.slow
# kfp.local's expected notes: it runs our image's code in this Python.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
def test_the_train_component_under_torchrun_gives_one_run_one_model_and_the_same_checkpoint_format(
        tmp_path, monkeypatch):
    """kfp.local runs the real train component twice on the same data: 1 process, and nproc=2 (torchrun, gloo)."""
    import mlflow
    import yaml
    from kfp import dsl, local

    from components import preprocess_data, raw_data, train_model
    from unet3plus.checkpoint import load_checkpoint

    params = tiny_params(train={"batch_size": 4, "device": "cpu"})
    # Two variants by name; "two" changes a value that keeps the checkpoint's shapes.
    params["ablations"] = {"variants": {"one": {}, "two": {"train.lr": 0.001}}, "run": []}
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(local.config.LocalExecutionConfig, "instance", None)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "workspace"))

    @dsl.pipeline(name="one-and-two-processes")
    def one_and_two_processes(params: str):
        raw = raw_data(dataset="liver", params=params)
        processed = preprocess_data(raw=raw.outputs["raw"], dataset="liver", params=params).outputs["processed"]
        train_model(processed=processed, params=params, ablation="one")
        # The variant travels as its name to the torchrun workers; the study stays that of the base parameters.
        train_model(processed=processed, params=params, ablation="two", nproc=2)

    one_and_two_processes(params=yaml.safe_dump(params))

    root = tmp_path / "root"
    [one] = root.glob("*/train-model/model")
    [two] = root.glob("*/train-model-2/model")
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    checkpoints = [load_checkpoint(directory / "best.pt") for directory in (one, two)]
    assert checkpoints[0].keys() == checkpoints[1].keys()
    assert {key: value.shape for key, value in checkpoints[0]["model"].items()} == {
        key: value.shape for key, value in checkpoints[1]["model"].items()}
    assert [len(checkpoint["rng"]) for checkpoint in checkpoints] == [1, 2]  # two ranks trained the second
    client = mlflow.MlflowClient(tracking_uri)
    found = client.search_runs([client.get_experiment_by_name(params["mlflow"]["experiment"]).experiment_id])
    # Besides the training runs, the one parent run of their study (same data, same base parameters).
    [parent] = [run for run in found if run.data.tags.get("study_parent") == "true"]
    runs = [run for run in found if run.data.tags.get("study_parent") != "true"]
    assert sorted(run.data.tags.get("ablation") for run in runs) == ["one", "two"]  # one MLflow run each
    assert all(run.data.tags.get("mlflow.parentRunId") == parent.info.run_id for run in runs)
    lr = {run.data.tags["ablation"]: float(run.data.params["train.lr"]) for run in runs}
    assert lr == {"one": params["train"]["lr"], "two": 0.001}  # the override reached the torchrun workers
    by_tag = {run.data.tags["ablation"]: run for run in runs}
    for name, checkpoint in zip(("one", "two"), checkpoints):
        assert by_tag[name].info.run_id == checkpoint["mlflow_run_id"] and by_tag[name].info.status == "FINISHED"
