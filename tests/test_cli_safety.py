"""The CLI as a hostile new user drives it: every mistake ends in exit 2 (130 for Ctrl-C) with one
line naming the file or key, no traceback, and no pre-existing file changed.

One tiny dataset (5 LiTS phantom cases of 32x32x8, a 1-epoch width-4 model, its evaluation) is made
once per module. The mistakes run in a few subprocesses: a driver process calls the console
script's ``main`` once per command line, with stderr redirected per command at the file
descriptor, so that imports are paid once (each `unet3plus` process costs seconds of imports).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unet3plus.config import load_config

pytestmark = pytest.mark.slow

TINY = [
    "--set", "data.size=32", "--set", "model.width=4", "--set", "train.epochs=1", "--set", "train.num_workers=0",
    "--set", "train.device=cpu", "--set", "evaluate.device=cpu", "--set", "mlflow.system_metrics=false",
    "--set", "data.workers=1",
]  # fmt: skip

DRIVER = textwrap.dedent(
    """
    import json, os, sys, tempfile, traceback
    from unet3plus.cli import main
    from pipeline.__main__ import main as pipeline_main

    results = []
    for case in json.load(sys.stdin):
        os.chdir(case["cwd"])
        saved_env = dict(os.environ)
        os.environ.update(case.get("env", {}))
        saved_fd = os.dup(2)
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                code = (pipeline_main if case.get("pipeline") else main)(case["argv"])
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:
                traceback.print_exc()
                code = "exception"
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            capture.seek(0)
            results.append({"code": code, "stderr": capture.read().decode(errors="replace")})
        os.environ.clear()
        os.environ.update(saved_env)
    json.dump(results, sys.stdout)
    """
)


def run_batch(cases: list[dict]) -> list[dict]:
    """Run ``unet3plus`` command lines (``{"argv", "cwd", "env"?}``; ``"pipeline": True`` for ``python -m
    pipeline``) in one driver subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps(cases, default=str), capture_output=True, text=True,
        env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def checksums(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """raw/ (5 cases), proc/ and proc2/ (another split), m/ (a finished run), ev/ (its evaluation)."""
    root = tmp_path_factory.mktemp("safety")
    steps = [
        ["synth", "--layout", "lits", "--out", "raw", "--cases", "5", "--size", "32", "--slices", "8"],
        ["preprocess", "--layout", "lits", "--raw", "raw", "--out", "proc", *TINY],
        ["preprocess", "--layout", "lits", "--raw", "raw", "--out", "proc2", *TINY, "--set", "data.split_seed=3"],
        ["train", "--data", "proc", "--out", "m", *TINY],
        ["evaluate", "--checkpoint", "m/best.pt", "--data", "proc", "--raw", "raw", "--out", "ev", *TINY],
    ]
    for step, result in zip(steps, run_batch([{"argv": argv, "cwd": root} for argv in steps])):
        assert result["code"] == 0, (step, result["stderr"][-2000:])
    return root


def expect_refusals(root: Path, cases: list[tuple], cwd: Path | None = None) -> list[dict]:
    """Run each ``(argv, words)`` and check: exit 2, one ``error:`` message (from that line on) holding
    every word, no traceback, every file under ``root`` unchanged. ``(argv, words, 0)``: a command
    that must succeed, with every word in its log."""
    before = checksums(root)
    results = run_batch([{"argv": case[0][1:] if case[0][0] == "pipeline" else case[0], "cwd": cwd or root,
                          "pipeline": case[0][0] == "pipeline"} for case in cases])
    for (argv, words, *code), result in zip(cases, results):
        stderr = result["stderr"]
        assert result["code"] == (code or [2])[0], (argv, result)
        assert "Traceback" not in stderr, (argv, stderr)
        message = stderr if code else stderr[stderr.find("error:"):]
        assert code or (stderr.count("error:") == 1 and message.startswith("error:")), (argv, stderr)
        for word in words:
            assert word in message, (argv, word, message)
    after = checksums(root)
    assert {k: v for k, v in after.items() if k in before} == before
    return results


def test_outputs_are_never_written_over_inputs(workspace):
    root = workspace
    first, second = (f"raw/{path.name}" for path in sorted((root / "raw").glob("volume-*.nii"))[:2])
    (root / "links").mkdir()
    (root / "links" / "scan.nii").symlink_to(root / first)
    os.link(root / second, root / "links" / "hard.nii")
    predict = ["predict", "--model", "m/best.pt", *TINY]
    preprocess = ["preprocess", "--layout", "lits", "--raw", "raw", *TINY]
    cases = [
        ([*predict, "--input", first, "--output", first], [first, "--input"]),
        ([*predict, "--input", first, "--output", f"./proc/../{first.replace('/', '//')}"], ["--input"]),
        ([*predict, "--input", first, "--output", str(root / "links/scan.nii")], ["scan.nii", "--input"]),
        ([*predict, "--input", "links/hard.nii", "--output", second], [second, "--input"]),
        ([*predict, "--input", first, "--output", "m/best.pt"], ["m/best.pt", "--model"]),
        ([*preprocess, "--out", "raw"], ["--raw"]),
        ([*preprocess, "--out", "raw/processed"], ["raw/processed", "--raw"]),
        ([*preprocess, "--out", f"{root}/links/../raw/x"], ["--raw"]),
        (["evaluate", "--checkpoint", "m/best.pt", "--data", "proc", "--raw", "raw", "--out", "raw/ev", *TINY], ["--raw"]),
        (["train", "--data", "proc", "--out", "proc/model", *TINY], ["--data"]),
        (["register", "--checkpoint", "m/best.pt", "--metrics", "ev/metrics.json", "--output", "ev/metrics.json", *TINY],
         ["--metrics"]),
    ]  # fmt: skip
    expect_refusals(root, cases)


def test_only_files_the_project_wrote_are_replaced(workspace):
    root = workspace
    (root / "ev" / "predictions" / "my_notes.txt").write_text("mine")
    (root / "ev2" / "overlays").mkdir(parents=True)
    (root / "ev2" / "overlays" / "figure.png").write_bytes(b"png")
    (root / "ev3").mkdir()
    (root / "ev3" / "metrics.json").write_text("{}")
    (root / "raw_user").mkdir()
    (root / "raw_user" / "volume-99.nii").write_bytes(b"a user's scan")
    (root / "m2").mkdir()
    (root / "m2" / "history.csv").write_text("epoch\n1\n")
    (root / "afile").write_text("not a folder")
    synth = ["synth", "--layout", "lits", "--cases", "1", "--size", "32", "--slices", "8"]
    evaluate = ["evaluate", "--checkpoint", "m/best.pt", "--data", "proc", "--raw", "raw", *TINY]
    before_raw = checksums(root / "raw")
    (root / "raw" / "README.txt").write_text("where I got these scans")  # the README's real-data steps
    cases = [
        ([*evaluate, "--out", "ev"], ["ev/predictions/my_notes.txt", "--force"]),
        ([*evaluate, "--out", "ev2"], ["ev2/overlays/figure.png", "--force"]),
        ([*evaluate, "--out", "ev3"], ["ev3/metrics.json"]),
        ([*synth, "--out", "raw"], ["raw/README.txt", "--force"]),
        ([*synth, "--out", "raw_user"], ["raw_user/volume-99.nii"]),
        ([*synth, "--out", "afile"], ["afile"]),
        (["train", "--data", "proc", "--out", "m", *TINY], ["m/last.pt", "--resume", "--force"]),
        (["train", "--data", "proc", "--out", "./m/", *TINY, "--set", "train.epochs=3"], ["last.pt", "--resume"]),
        (["train", "--data", "proc", "--out", "m2", *TINY], ["m2/history.csv", "--force"]),
        # what synth wrote and recorded it replaces (and the new folder gets the umask, not mkdtemp's 0700)
        ([*synth, "--out", "raw_again"], ["wrote 1"], 0),
        ([*synth, "--out", "raw_again"], ["wrote 1"], 0),
    ]
    expect_refusals(root, cases)
    (root / "raw" / "README.txt").unlink()
    assert checksums(root / "raw") == before_raw
    (root / "ev" / "predictions" / "my_notes.txt").unlink()
    mode = (root / "raw_again").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # the umask, not mkdtemp's 0700


def test_every_command_that_writes_a_file_keeps_the_users_files(workspace):
    """report (its .md, .csv, .json and _plots/), validate --report, register/predict --output, synth --preview
    and the pipeline CLI's compile/trainjob --output: never over an input (the parameters file included),
    never over a file unet3plus did not write (without --force); what they wrote they may replace."""
    root = workspace
    (root / "notes.md").write_text("my notes")
    (root / "mine.csv").write_text("a,b\n")
    (root / "figs_plots").mkdir()
    (root / "figs_plots" / "sketch.png").write_bytes(b"png")
    (root / "p.yaml").write_text("train:\n  epochs: 1\n")
    (root / "params.yaml").write_text("train:\n  epochs: 1\n")
    (root / "mask.nii.gz").write_bytes(b"a mask I drew")
    (root / "a_folder.nii.gz").mkdir()
    scan = next(path.name for path in (root / "raw").glob("volume-*.nii"))
    trainjob = ["pipeline", "trainjob", "--nodes", "2", "--gpus-per-node", "1", "--params", "p.yaml"]
    cases = [
        (["report", "--out", "notes.md"], ["notes.md", "--force"]),
        (["report", "--out", "mine.md"], ["mine.csv", "--force"]),
        (["report", "--out", "figs.md"], ["figs_plots/sketch.png", "--force"]),
        (["report", "--out", "./raw/../params.yaml"], ["--params", "params.yaml"]),
        (["report", "--out", "README.md", "--readme", "README.md"], ["--readme"]),
        (["validate", "--layout", "lits", "--raw", "raw", "--report", "notes.md"], ["notes.md", "--force"]),
        (["register", "--checkpoint", "m/best.pt", "--metrics", "ev/metrics.json", "--output", "notes.md", *TINY],
         ["notes.md", "--force"]),
        (["predict", "--model", "m/best.pt", "--input", f"raw/{scan}", "--output", "mask.nii.gz", *TINY],
         ["mask.nii.gz", "--force"]),
        (["predict", "--model", "m/best.pt", "--input", f"raw/{scan}", "--output", "a_folder.nii.gz", *TINY],
         ["a_folder.nii.gz", "folder"]),
        (["synth", "--layout", "lits", "--out", "raw_new", "--preview", "notes.md"], ["notes.md", "--force"]),
        ([*trainjob, "--output", "p.yaml"], ["p.yaml", "--params"]),
        ([*trainjob, "--output", "notes.md"], ["notes.md", "--force"]),
        (["pipeline", "compile", "--output", "params.yaml"], ["params.yaml", "--params"]),  # compile reads it
        (["pipeline", "compile", "--output", "notes.md"], ["notes.md", "--force"]),
        (["pipeline", "compile", "--output", "raw"], ["raw", "folder"]),
        # what they wrote, they replace
        (["report", "--out", "rep/ablations.md", *TINY], ["written to rep/ablations.md"], 0),
        (["report", "--out", "rep/ablations.md", *TINY], ["written to rep/ablations.md"], 0),
        ([*trainjob, "--output", "job.yaml"], ["written to job.yaml"], 0),
        ([*trainjob, "--output", "job.yaml", "--set", "train.epochs=2"], ["written to job.yaml"], 0),
    ]  # fmt: skip
    expect_refusals(root, cases)
    assert "epochs=2" in (root / "job.yaml").read_text()
    assert (root / "rep" / "ablations_plots" / "dice_vs_params.png").is_file()
    (root / "rep" / "ablations.csv").write_text("edited")
    expect_refusals(root, [(["report", "--out", "rep/ablations.md", *TINY], ["rep/ablations.csv", "--force"])])
    for name in ("notes.md", "mine.csv", "p.yaml", "params.yaml", "mask.nii.gz"):
        (root / name).unlink()
    shutil.rmtree(root / "figs_plots")


def test_bad_scans_checkpoints_and_devices_are_one_line_before_the_model_loads(workspace, tmp_path):
    """Scans with NaNs, RGB voxels, a singular affine or a header claiming 4000^3 voxels; checkpoints with an
    unknown model key, a truncated tensor, a missing one or an absurd width; CUDA asked for where there is none;
    a mask named only '.nii.gz'; report's file-system errors named as such."""
    root = workspace
    scan = min((root / "raw").glob("volume-*.nii"))
    image = nib.load(scan)
    voxels = np.asarray(image.dataobj).astype(np.float32)
    voxels[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(voxels, image.affine), tmp_path / "nan.nii.gz")
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, image.affine), tmp_path / "rgb.nii.gz")
    singular = bytearray(scan.read_bytes())
    struct.pack_into("<hh", singular, 252, 0, 1)  # qform_code 0, sform_code 1: the srow_* rows are the affine
    struct.pack_into("<12f", singular, 280, *([0.0, 0.0, 0.0, 1.0] * 3))
    (tmp_path / "singular.nii").write_bytes(bytes(singular))
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), image.affine)
    huge.header.set_data_shape((4000, 4000, 4000))
    (tmp_path / "huge.nii").write_bytes(huge.header.binaryblock + bytes(4 + 16))
    checkpoint = torch.load(root / "m" / "best.pt", weights_only=True)
    first = next(iter(checkpoint["model"]))
    broken = {
        "unknown_key": {**checkpoint, "config": {**checkpoint["config"], "model": {**checkpoint["config"]["model"], "colour": 1}}},
        "wide": {**checkpoint, "config": {**checkpoint["config"], "model": {**checkpoint["config"]["model"], "width": 100000}}},
        "truncated": {**checkpoint, "model": {**checkpoint["model"], first: checkpoint["model"][first][:1]}},
        "missing": {**checkpoint, "model": {k: v for k, v in checkpoint["model"].items() if k != first}},
    }  # fmt: skip
    for name, payload in broken.items():
        torch.save(payload, tmp_path / f"{name}.pt")
    (tmp_path / "plots_plots").write_text("a file where report puts its plots folder")
    predict = ["predict", "--model", "m/best.pt", *TINY, "--output", str(tmp_path / "mask.nii.gz")]
    cases = [
        ([*predict, "--input", str(tmp_path / "nan.nii.gz")], ["nan.nii.gz", "NaN"]),
        ([*predict, "--input", str(tmp_path / "rgb.nii.gz")], ["rgb.nii.gz", "RGB"]),
        ([*predict, "--input", str(tmp_path / "singular.nii")], ["singular.nii", "not invertible"]),
        ([*predict, "--input", str(tmp_path / "huge.nii")], ["huge.nii", "4000 x 4000 x 4000", "GiB"]),
        (["predict", "--model", "m/best.pt", "--input", str(scan), "--output", str(tmp_path / ".nii.gz"), *TINY],
         [".nii.gz", "mask.nii.gz"]),
        *[(["predict", "--model", str(tmp_path / f"{name}.pt"), "--input", str(scan), "--output",
            str(tmp_path / "mask.nii.gz"), *TINY], [f"{name}.pt", *words])
          for name, words in [("unknown_key", ["model.colour"]), ("wide", ["model.width", "100000"]),
                              ("truncated", [first, "shape"]), ("missing", ["1 missing", first])]],
        (["evaluate", "--checkpoint", str(tmp_path / "wide.pt"), "--data", "proc", "--raw", "raw", "--out",
          str(tmp_path / "ev"), *TINY], ["wide.pt", "model.width"]),
        ([*predict, "--input", str(scan), "--set", "evaluate.device=cuda"], ["evaluate.device", "CUDA"]),
        (["train", "--data", "proc", "--out", str(tmp_path / "run"), *TINY, "--set", "train.device=cuda"],
         ["train.device", "CUDA"]),
        (["report", "--out", str(tmp_path / "plots.md"), *TINY], ["plots_plots", "is a file"]),
    ]  # fmt: skip
    if torch.cuda.is_available():
        cases = [case for case in cases if "CUDA" not in case[1]]
    expect_refusals(root, cases)
    assert not (tmp_path / "mask.nii.gz").exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "ev").exists() and not (tmp_path / "plots.md").exists()


def test_invalid_settings_are_refused_naming_the_key(workspace, tmp_path):
    root = workspace
    train = ["train", "--data", "proc", "--out", str(tmp_path / "new"), *TINY]
    (root / "params.yaml").write_text("train:\n  epochs: 1\n")  # --set errors must not be blamed on it
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    dup_section = tmp_path / "dup_section.yaml"
    dup_section.write_text("model:\n  width: 4\nmodel:\n  width: 8\n")
    binary = tmp_path / "params.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    inf_file = tmp_path / "inf.yaml"
    inf_file.write_text("loss:\n  iou_weight: .inf\n")
    weights = ["--set", "model.encoder=vgg16", "--set", f"model.encoder_weights={tmp_path / 'missing.pth'}"]
    cases = [
        ([*train, "--set", "train.lr=.inf"], ["--set", "train.lr", "finite"]),
        ([*train, "--set", "train.lr=.NaN"], ["train.lr", "finite"]),
        ([*train, "--set", "loss.focal_weight=.inf"], ["loss.focal_weight"]),
        ([*train, "--set", "data.hu_window=[-.inf, .inf]"], ["data.hu_window"]),
        ([*train, "--params", str(inf_file)], [str(inf_file), "loss.iou_weight"]),
        ([*train, "--params", str(dup)], [str(dup), "line 4", "duplicate key 'lr'"]),
        ([*train, "--params", str(dup_section)], [str(dup_section), "duplicate key 'model'"]),
        ([*train, "--params", str(binary)], [str(binary), "not a text file"]),
        ([*train, "--set", "train.epochs=many"], ["--set", "train.epochs"]),
        ([*train, "--set", "model.in_channels=1"], ["model.in_channels"]),
        ([*train, "--set", "model.num_classes=2"], ["model.num_classes"]),
        ([*train, "--set", "train.momentum=-5"], ["train.momentum"]),
        ([*train, "--set", "train.device=banana"], ["train.device", "banana"]),
        ([*train, "--set", "evaluate.device=gpu0"], ["evaluate.device"]),
        ([*train, *weights], ["model.encoder_weights", "missing.pth"]),
        ([*train, "--set", f"model.encoder_weights={dup}"], ["model.encoder_weights"]),
    ]
    results = expect_refusals(root, cases)
    for (argv, _), result in zip(cases, results):
        if "--params" not in argv:
            assert "params.yaml:" not in result["stderr"], result["stderr"]
    assert not (tmp_path / "new").exists()
    (root / "params.yaml").unlink()


def test_scientific_notation_and_empty_params(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-4\nloss:\n  focal_weight: 1.5e+0\n")
    config = load_config(params, ["train.momentum=1E-3", "evaluate.threshold=5e-1"])
    assert (config.train.lr, config.train.weight_decay, config.loss.focal_weight) == (1e-4, 5e-4, 1.5)
    assert (config.train.momentum, config.evaluate.threshold) == (1e-3, 0.5)
    params.write_text("# nothing yet\n")
    assert load_config(params) == load_config(None)
    assert "empty" in caplog.text and str(params) in caplog.text


def test_training_evaluation_and_registration_refuse_garbage(workspace, tmp_path):
    root = workspace
    metrics = json.loads((root / "ev" / "metrics.json").read_text())
    variants = {
        "other_checkpoint.json": {**metrics, "checkpoint_sha256": "0" * 64},
        "no_hash.json": {k: v for k, v in metrics.items() if k != "checkpoint_sha256"},
        "other_data.json": {**metrics, "data_hash": "f" * 32},
    }
    for name, payload in variants.items():
        (tmp_path / name).write_text(json.dumps(payload))
    (tmp_path / "nan.json").write_text(json.dumps({**metrics, "dice": float("nan")}))  # json writes NaN
    (tmp_path / "inf.json").write_text(json.dumps({**metrics, "iou": float("inf")}))
    register = ["register", "--checkpoint", "m/best.pt", *TINY, "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/r.db"]
    cases = [
        ([*register, "--metrics", str(tmp_path / "other_checkpoint.json")], ["other_checkpoint.json", "m/best.pt"]),
        ([*register, "--metrics", str(tmp_path / "no_hash.json")], ["no_hash.json", "evaluate"]),
        ([*register, "--metrics", str(tmp_path / "other_data.json")], ["other_data.json", "data"]),
        ([*register, "--metrics", str(tmp_path / "nan.json")], ["nan.json", "dice"]),
        ([*register, "--metrics", str(tmp_path / "inf.json")], ["inf.json", "iou"]),
        (["train", "--data", "proc2", "--out", "m", "--resume", *TINY, "--set", "train.epochs=2"], ["m/last.pt", "data"]),
        (["train", "--data", "proc", "--out", str(tmp_path / "nan"), *TINY, "--set", "train.optimizer=sgd",
          "--set", "train.lr=1e30", "--set", "train.momentum=0", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/n.db"],
         ["train.lr"]),
        (["preprocess", "--layout", "lits", "--raw", "raw", "--out", str(tmp_path / "p"), *TINY,
          "--set", "data.val_fraction=0"], ["raw", "validation split", "data.val_fraction"]),
        (["train", "--data", "proc", "--out", "m", "--resume", *TINY], ["all 1 epochs are already done"], 0),
    ]  # fmt: skip
    expect_refusals(root, cases)
    assert not (tmp_path / "nan" / "best.pt").exists() and not (tmp_path / "r.db").exists()


def test_file_system_and_tracking_errors_are_one_line(workspace, tmp_path):
    root = workspace
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    scan = str(sorted((root / "raw").glob("volume-*.nii"))[0])
    predict = ["predict", "--model", str(root / "m/best.pt"), "--input", scan, *TINY]
    cases = [
        ([*predict, "--output", str(tmp_path / "afile/mask.nii.gz")], ["afile", "not a folder"]),
        ([*predict, "--output", str(tmp_path / "mask.png")], ["mask.png", ".nii.gz"]),
        ([*predict, "--output", str(tmp_path / "mask.nii.gzz")], ["mask.nii.gzz"]),
        (["train", "--data", str(root / "proc"), "--out", str(tmp_path / "afile/run"), *TINY], ["afile"]),
        (["train", "--data", str(root / "proc"), "--out", str(tmp_path / "afile"), *TINY], ["afile", "not a folder"]),
        (["evaluate", "--checkpoint", str(root / "m/best.pt"), "--data", str(root / "proc"), "--raw", str(root / "raw"),
          "--out", str(tmp_path / "afile"), *TINY], ["afile"]),
        (["report", "--out", str(tmp_path / "afile/table.md")], ["afile"]),
        (["report"], ["mlflow.db", "no MLflow tracking store"]),
        (["predict", "--model", "models:/unet3plus-liver@champion", "--input", scan,
          "--output", str(tmp_path / "m.nii.gz")], ["mlflow.db"]),
        (["report", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'notes.txt'}"], ["notes.txt"]),
    ]  # fmt: skip
    expect_refusals(root, cases, cwd=empty)
    assert not (empty / "mlflow.db").exists() and list(empty.iterdir()) == []
    assert (tmp_path / "notes.txt").read_text() == "not a database\n" * 100


def test_data_problems_are_found_by_validation(workspace, tmp_path):
    root = workspace
    complex_raw = tmp_path / "complex"
    complex_raw.mkdir()
    volume = sorted((root / "raw").glob("volume-*.nii"))[0]
    for path in (volume, volume.with_name(volume.name.replace("volume", "segmentation"))):
        (complex_raw / path.name).write_bytes(path.read_bytes())
    image = nib.load(complex_raw / volume.name)
    data = np.asarray(image.dataobj).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, image.affine), complex_raw / volume.name)
    batches = tmp_path / "lits"
    batches.mkdir()
    (batches / "Training Batch 1").symlink_to(root / "raw", target_is_directory=True)
    validate = ["validate", "--layout", "lits", *TINY]
    cases = [
        ([*validate, "--raw", str(complex_raw)], [volume.name, "complex"]),
        ([*validate, "--raw", str(batches)], ["5 cases valid"], 0),
    ]
    expect_refusals(root, cases)


def test_a_second_training_into_a_busy_out_is_refused_and_ctrl_c_exits_130(workspace, tmp_path):
    """While a training runs, another into the same --out (any spelling) is refused naming the holder; Ctrl-C
    then says 'interrupted', exits 130 and releases the lock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "unet3plus", "train", "--data", "proc", "--out", str(tmp_path / "run"), *TINY,
               "--set", "train.epochs=500"]  # fmt: skip
    # Ctrl-C as in a terminal, even when the suite itself runs with SIGINT ignored (`nohup ... &` starts
    # background jobs so, and children inherit it: Python then never raises KeyboardInterrupt).
    process = subprocess.Popen(command, cwd=workspace, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:  # interrupt in the middle of training
        lines.append(process.stderr.readline())
        if "epoch 1/500" in lines[-1]:
            break
    second = ["train", "--data", "proc", "--out", f"{tmp_path}/../{tmp_path.name}/run", *TINY, "--set", "train.epochs=2"]
    refusal = run_batch([{"argv": second, "cwd": workspace}])[0]  # (the first one writes on, so no checksums)
    assert refusal["code"] == 2 and refusal["stderr"].startswith("error: ") and "Traceback" not in refusal["stderr"]
    assert all(word in refusal["stderr"] for word in ("run", "a training", f"pid {process.pid}", "started")), refusal
    assert process.poll() is None  # the first one goes on
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=300)[1]  # a loaded 2-core machine can take a while to exit
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("interrupted"), stderr
    assert not (tmp_path / "run" / ".unet3plus.lock").exists()
