"""TrainJob across nodes: the manifest against the Trainer v2.3.0 CRD, the launcher against a fake Kubernetes API.

Only the API server is faked (a real HTTP server on 127.0.0.1 with the few endpoints the launcher
uses); the real ``kubernetes`` client talks to it, and the launcher component's real code runs.
When the fake "cluster" runs a job, it runs the job's own command (torchrun -m unet3plus train).
"""

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import mlflow
import pytest
import yaml
from fake_http import JsonHandler
from kfp import dsl
from kubernetes import client as k8s

from components import preprocess_data, raw_data
from components.launch import train_on_trainjob
from tests.conftest import tiny_params
from unet3plus.checkpoint import load_checkpoint
from unet3plus.config import apply_overrides, load_config
from unet3plus.errors import UserError
from unet3plus.trainjob import (
    MANAGER,
    TrainJobSettings,
    render_trainjob,
    run_trainjob,
    train_arguments,
    worker_arguments,
)

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "schemas" / "trainer.kubeflow.org_trainjobs.yaml"


@pytest.fixture(scope="module")
def validator(crd_validator):
    return crd_validator(CRD, "v1alpha1")


def _params() -> str:
    return yaml.safe_dump(tiny_params(train={"device": "cpu"}))


SETTINGS = [
    TrainJobSettings(),
    TrainJobSettings(nodes=4, gpus_per_node=8, gpu_type="amd.com/gpu", mlflow_secret=None, node_selector=None,
                     toleration=None, image_pull_secrets=("regcred",), labels=(("team", "imaging"),)),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_the_trainjob_validates_strictly_against_the_trainer_v2_3_0_crd(validator, settings):
    config = load_config(ROOT / "params.yaml", ["train.epochs=3"])
    job = render_trainjob("unet3plus-liver-1", "team-a", settings,
                          train_arguments(config, "/mnt/workspace/data", "/mnt/workspace/model"))
    validator.validate(job)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert (spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]) == (settings.nodes, settings.gpus_per_node)
    resources = spec["trainer"]["resourcesPerNode"]
    assert resources["limits"][settings.gpu_type] == settings.gpus_per_node
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert spec["activeDeadlineSeconds"] == settings.deadline_seconds
    # What the schema does not check: an RFC 1035 name, the runtime's container, env only in trainer.env.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"])
    [patch] = spec["runtimePatches"]
    assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/[a-z0-9-]+", patch["manager"]) and patch["manager"] == MANAGER
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert replicated["name"] == "node" and [c["name"] for c in pod["containers"]] == ["node"]
    assert all("env" not in container for container in pod["containers"])
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": settings.shm_size}
    assert volumes[mounts["/mnt/workspace"]]["persistentVolumeClaim"]["claimName"] == settings.workspace_pvc
    env = spec["trainer"]["env"]
    assert not [e["name"] for e in env if e["name"].startswith("PET_")]  # the Trainer's own rendezvous variables
    assert all(set(e) == {"name", "valueFrom"} and set(e["valueFrom"]) == {"secretKeyRef"} for e in env)
    if settings.mlflow_secret:
        uri = next(e for e in env if e["name"] == "MLFLOW_TRACKING_URI")["valueFrom"]["secretKeyRef"]
        assert uri == {"name": settings.mlflow_secret, "key": "MLFLOW_TRACKING_URI"}
    else:
        assert env == []
    # torchrun reads the rendezvous from PET_*; the arguments rebuild exactly the configuration.
    assert spec["trainer"]["command"] == ["torchrun", "-m", "unet3plus"]
    args = spec["trainer"]["args"]
    assert args[:5] == ["train", "--data", "/mnt/workspace/data", "--out", "/mnt/workspace/model"]
    rebuilt = apply_overrides(load_config(None, []), args[6::2])
    for section in ("model", "loss", "train", "mlflow"):
        assert rebuilt.to_dict()[section] == config.to_dict()[section]


@pytest.mark.parametrize("path, value", [
    (("spec", "trainer", "numProcsPerNode"), 4),  # misspelled
    (("spec", "activeDeadline"), 60),  # misspelled
    (("spec", "trainer", "numNodes"), "2"),  # wrong type
    (("spec", "runtimeRef", "name"), None),  # required, removed
])
def test_the_strict_schema_catches_misspelled_mistyped_and_missing_fields(validator, path, value):
    job = render_trainjob("unet3plus-liver", None, TrainJobSettings(), ["train"])
    broken = copy.deepcopy(job)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    validator.validate(job)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, check=False)


def test_trainjob_command_writes_a_manifest_for_kubectl(validator, tmp_path):
    output = tmp_path / "job.yaml"
    result = _run("trainjob", "--params", "params.yaml", "--dataset", "spleen", "--nodes", "2", "--gpus-per-node", "4",
                  "--image", "registry.example.com:5000/team/unet3plus:1.2", "--workspace-pvc", "ct-data",
                  "--namespace", "team-a", "--name", "spleen-run-7", "--set", "train.epochs=7", "--output", str(output))
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(output.read_text())
    validator.validate(job)
    assert job["metadata"] == {"name": "spleen-run-7", "namespace": "team-a",
                               "labels": {"app.kubernetes.io/name": "unet3plus"}}
    assert job["spec"]["trainer"]["image"] == "registry.example.com:5000/team/unet3plus:1.2"
    assert "train.epochs=7" in job["spec"]["trainer"]["args"]
    assert "/mnt/workspace/processed/spleen" in job["spec"]["trainer"]["args"]
    assert job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "ct-data"}


def test_pipeline_flags_mean_one_thing_across_verbs():
    """A flag two verbs share names the same setting in both (e.g. --workspace-pvc, never --data-pvc for it)."""
    from pipeline.__main__ import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    helps = {}
    for verb, parser in verbs.items():
        for action in parser._actions:
            for flag in action.option_strings:
                helps.setdefault(flag, {})[verb] = action.dest
    shared = {flag: dests for flag, dests in helps.items() if len(dests) > 1}
    assert {"--workspace-pvc", "--workspace-mount", "--nodes", "--gpus-per-node", "--params"} <= set(shared)
    for flag, dests in shared.items():  # one destination (so one setting) per flag, in every verb
        assert len(set(dests.values())) == 1, (flag, dests)
    # --data-pvc is the raw-data claim of compile and submit; trainjob has no raw-data step, so no --data-pvc.
    assert set(helps["--data-pvc"]) == {"compile", "submit"}


def test_trainjob_reads_the_params_yaml_of_the_working_folder_like_every_command(tmp_path, monkeypatch):
    """Without --params, ./params.yaml is the configuration (issue 20: it trained the built-in defaults)."""
    from pipeline.__main__ import main

    (tmp_path / "params.yaml").write_text("model:\n  width: 24\ntrain:\n  optimizer: adamw\n  epochs: 3\n")
    monkeypatch.chdir(tmp_path)
    assert main(["trainjob", "--nodes", "2", "--gpus-per-node", "1", "--output", "job.yaml"]) == 0
    args = yaml.safe_load((tmp_path / "job.yaml").read_text())["spec"]["trainer"]["args"]
    assert {"model.width=24", 'train.optimizer="adamw"', "train.epochs=3"} <= set(args)


BAD_INPUT = [
    (["compile", "--nodes", "0"], "--nodes must be a positive integer"),
    (["compile", "--nodes=-3"], "--nodes must be a positive integer"),
    (["compile", "--gpus", "-1"], "--gpus must be a positive integer"),
    (["compile", "--gpus", "1.5"], "--gpus must be a positive integer"),
    (["compile", "--gpus=two"], "--gpus must be a positive integer"),
    (["compile", "--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node must be a positive integer"),
    (["compile", "--gpus-per-node", "2"], "--nodes (needed by --gpus-per-node)"),
    (["compile", "--shm-size", "banana"], "--shm-size 'banana' is not a Kubernetes quantity"),
    (["compile", "--gpu-type", ""], "--gpu-type '' is not a resource name"),
    (["compile", "--mlflow-secret"], "--mlflow-secret: expected one argument"),
    (["compile", "--image-pull-secret", ""], "--image-pull-secret '' is not a valid Kubernetes name"),
    (["compile", "--resources", "train=8,lots"], "the memory of train 'lots' is not a Kubernetes quantity"),
    (["submit", "--host", "http://127.0.0.1:9", "--nodes", "0"], "--nodes must be a positive integer"),
    (["submit", "--host", "http://127.0.0.1:9", "--namespace", "Team_A"], "--namespace 'Team_A' is not a valid name"),
    (["trainjob", "--nodes", "2", "--gpus-per-node", "4", "--name", "Bad_Name"], "--name 'Bad_Name' is not a valid"),
    (["trainjob", "--nodes", "2", "--gpus-per-node", "4", "--image", "Ghcr.io/Org/Image:latest tag"],
     "is not a container image reference"),
    # label and taint keys, label values and mount paths, as the API server checks them
    (["compile", "--data-mount", "data"], "--data-mount 'data' is not a usable mount path"),
    (["trainjob", "--nodes", "2", "--gpus-per-node", "1", "--workspace-mount", "/dev/shm"], "is not a usable mount path"),
    (["compile", "--gpu-toleration", "gpu node"], "--gpu-toleration 'gpu node' is not a valid label key"),
    (["compile", "--gpu-node-selector", "a/b/c=true"], "'a/b/c' is not a valid label key"),
    (["trainjob", "--nodes", "2", "--gpus-per-node", "1", "--pod-label", "team=a b"], "'a b' is not a valid label value"),
]


def test_bad_input_is_one_line_exit_2_before_anything_is_written(tmp_path):
    """Each spelling is its own subprocess; four run side by side to keep the suite fast."""
    output = tmp_path / "out.yaml"

    def start(args):
        command = [sys.executable, "-m", "pipeline", *args] + (["--output", str(output)] if args[0] != "submit" else [])
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for first in range(0, len(BAD_INPUT), 4):
        batch = [(start(args), args, message) for args, message in BAD_INPUT[first:first + 4]]
        for process, args, message in batch:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 2, (args, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in stderr, (args, stderr)
            assert message in lines[0], (args, lines[0])
    assert not output.exists()


def test_bad_image_from_the_environment_is_refused_before_compiling(tmp_path):
    output = tmp_path / "out.yaml"
    result = subprocess.run([sys.executable, "-m", "pipeline", "compile", "--output", str(output)], cwd=ROOT,
                            env={**os.environ, "UNET3PLUS_IMAGE": "not an image"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: UNET3PLUS_IMAGE 'not an image' is not a container image reference; write e.g. "
        "ghcr.io/unet3plus/unet3plus:0.1.0"]
    assert not output.exists()


def test_submit_to_a_dead_or_silent_host_fails_in_one_line_within_the_timeout():
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does) and never answers
        port = silent.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]  # closed again below: nothing listens there
        cases = [(f"http://127.0.0.1:{port}", "did not answer within 3 s"),
                 (f"http://127.0.0.1:{dead_port}", "could not be reached")]
        for host, message in cases:
            started = time.monotonic()
            result = _run("submit", "--host", host, "--timeout", "3")
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
            assert time.monotonic() - started < 90


class FakeKubernetes:
    """The Kubernetes API endpoints the launcher uses, on 127.0.0.1, with scripted TrainJob outcomes.

    ``outcome``: ``"Complete"`` (after ``polls`` status reads; with ``run_command`` the job's own
    command really runs first, its output being node 0's log), ``"Failed"`` or ``"Never"``.
    """

    def __init__(self, outcome="Complete", polls=2, run_command=False):
        self.outcome, self.polls, self.run_command = outcome, polls, run_command
        self.created, self.deleted, self.reads, self.selectors = [], [], 0, []
        self.log = b"epoch 1/1: loss 0.9\nbest val Dice 0.5\n"
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.created.append((urlparse(self.path).path, body))
                if fake.run_command:
                    fake.execute(body)
                self.reply(201, body)

            def do_DELETE(self):
                fake.deleted.append(urlparse(self.path).path)
                self.reply(200, {"kind": "Status", "status": "Success"})

            def do_GET(self):
                url = urlparse(self.path)
                if "/trainjobs/" in url.path:
                    fake.reads += 1
                    job = copy.deepcopy(fake.created[-1][1])
                    if fake.reads > fake.polls and fake.outcome != "Never":
                        job["status"] = {"conditions": [{
                            "type": fake.outcome, "status": "True", "reason": "Reason" + fake.outcome,
                            "message": "node 1 exited with code 137", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
                    return self.reply(200, job)
                if url.path.endswith("/pods"):
                    fake.selectors.append(parse_qs(url.query)["labelSelector"][0])
                    pod = {"metadata": {"name": "job-node-0-0-abcde", "namespace": "team-a"},
                           "status": {"phase": "Running"}}
                    return self.reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]})
                if url.path.endswith("/log"):
                    assert parse_qs(url.query)["container"] == ["node"]
                    return self.reply(200, fake.log, "text/plain")
                return self.reply(404, {"kind": "Status", "code": 404})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def execute(self, job):
        """Run the TrainJob's command as one node with one process would (torchrun reads PET_*)."""
        trainer = job["spec"]["trainer"]
        assert trainer["command"][0] == "torchrun"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   *trainer["command"][1:], *trainer["args"]]
        result = subprocess.run(command, capture_output=True, timeout=600, check=False)
        self.log = result.stdout + result.stderr
        assert result.returncode == 0, self.log.decode()[-3000:]

    def api_client(self):
        configuration = k8s.Configuration()
        configuration.host = self.url
        return k8s.ApiClient(configuration)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "team-a"}}],
        }))
        return path

    def close(self):
        self.server.shutdown()


@pytest.fixture
def fake_kubernetes():
    servers = []

    def start(**kwargs):
        servers.append(FakeKubernetes(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _job(name="unet3plus-test"):
    return render_trainjob(name, "team-a", TrainJobSettings(), ["train"])


def test_run_trainjob_creates_streams_node_0_logs_waits_and_deletes(fake_kubernetes, caplog):
    fake = fake_kubernetes(outcome="Complete", polls=2)
    caplog.set_level("INFO", logger="unet3plus")
    job = run_trainjob(_job(), "team-a", timeout_seconds=30, poll_seconds=0.05, api_client=fake.api_client())
    assert job["status"]["conditions"][0]["type"] == "Complete"
    [(path, body)] = fake.created
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    assert body["metadata"]["name"] == "unet3plus-test"
    assert fake.reads == 3
    assert fake.selectors[0] == ("jobset.sigs.k8s.io/jobset-name=unet3plus-test,"
                                 "batch.kubernetes.io/job-completion-index=0")
    assert "[job-node-0-0-abcde] best val Dice 0.5" in caplog.text
    assert fake.deleted == ["/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/unet3plus-test"]


def test_a_failed_trainjob_raises_its_reason_and_is_kept_for_inspection(fake_kubernetes):
    fake = fake_kubernetes(outcome="Failed", polls=1)
    with pytest.raises(UserError, match=r"TrainJob team-a/unet3plus-test failed \(ReasonFailed: node 1 exited"):
        run_trainjob(_job(), "team-a", timeout_seconds=30, poll_seconds=0.05, api_client=fake.api_client())
    assert fake.deleted == []
    fake = fake_kubernetes(outcome="Failed", polls=0)
    with pytest.raises(UserError, match="failed"):
        run_trainjob(_job(), "team-a", timeout_seconds=30, cleanup="always", poll_seconds=0.05,
                     api_client=fake.api_client())
    assert len(fake.deleted) == 1


def test_a_trainjob_past_the_timeout_is_deleted_and_reported(fake_kubernetes):
    fake = fake_kubernetes(outcome="Never")
    started = time.monotonic()
    with pytest.raises(UserError, match="did not finish within 1 s"):
        run_trainjob(_job(), "team-a", timeout_seconds=1, poll_seconds=0.1, api_client=fake.api_client())
    assert 1 <= time.monotonic() - started < 10
    assert len(fake.deleted) == 1
    fake = fake_kubernetes(outcome="Never")
    with pytest.raises(UserError, match="did not finish"):
        run_trainjob(_job(), "team-a", timeout_seconds=0.3, cleanup="never", poll_seconds=0.1,
                     api_client=fake.api_client())
    assert fake.deleted == []


@pytest.mark.slow
def test_the_launcher_component_trains_through_a_trainjob_and_hands_on_the_model(
        fake_kubernetes, tmp_path, monkeypatch):
    """The launcher's real code, the real kubernetes client (kubeconfig), the job's real command."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)
    params = _params()
    raw = dsl.Dataset(name="raw", uri=str(tmp_path / "raw"), metadata={})
    raw_data.python_func(raw=raw, dataset="liver", params=params)
    processed = dsl.Dataset(name="processed", uri=str(tmp_path / "processed"), metadata={})
    preprocess_data.python_func(raw=raw, processed=processed, dataset="liver", params=params)

    fake = fake_kubernetes(outcome="Complete", polls=0, run_command=True)
    # Not in a pod, so the launcher falls back to the kubeconfig (KUBECONFIG is read when kubernetes is imported).
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(fake.kubeconfig(tmp_path / "kubeconfig")))
    workspace = tmp_path / "workspace"
    # As KFP hands it over: JSON, so lists for tuples and floats for integers.
    job = {**{key: value for key, value in TrainJobSettings().__dict__.items()}, "node_selector": ["a", "b"],
           "nodes": 2.0, "gpus_per_node": 1.0,
           "workspace_mount": str(workspace), "namespace": "team-a", "timeout_seconds": 600, "cleanup": "on-success",
           "poll_seconds": 0.2}
    model = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata={})
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={})
    dice = train_on_trainjob.python_func(processed=processed, model=model, metrics=metrics, params=params, job=job,
                                         ablation="unet")

    [(_, body)] = fake.created
    name = body["metadata"]["name"]
    assert re.fullmatch(r"unet3plus-[0-9a-f]{10}", name) and len(fake.deleted) == 1
    assert body["spec"]["trainer"]["args"] == worker_arguments(
        str(workspace / "unet3plus" / name / "params.yaml"), str(workspace / "unet3plus" / name / "data"),
        str(workspace / "unet3plus" / name / "model"), "unet")
    out = Path(model.path)
    assert {"best.pt", "last.pt", "history.csv", "train_summary.json"} <= {p.name for p in out.iterdir()}
    trained = load_checkpoint(out / "best.pt")["config"]["model"]
    assert (trained["width"], trained["arch"], trained["deep_supervision"]) == (4, "unet", False)  # the variant
    summary = json.loads((out / "train_summary.json").read_text())
    assert dice == pytest.approx(summary["best_val_dice"]) == pytest.approx(model.metadata["best_val_dice"])
    assert model.metadata["mlflow_run_id"] == summary["mlflow_run_id"]
    assert not (workspace / "unet3plus" / name / "data").exists()  # the staged copy is removed
    found = mlflow.MlflowClient(tracking_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri).get_experiment_by_name("unet3plus").experiment_id])
    # Besides the training run, the parent run of its study (the base parameters, without the variant).
    [parent] = [run for run in found if run.data.tags.get("study_parent") == "true"]
    runs = [run for run in found if run.data.tags.get("study_parent") != "true"]
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]]  # one run: the job's
    assert runs[0].data.tags["ablation"] == "unet" and runs[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert body["spec"]["trainer"]["args"][-2:] == ["--ablation", "unet"]  # the job's run is the variant's
    assert (parent.data.params["model.arch"], runs[0].data.params["model.arch"]) == ("unet3plus", "unet")
