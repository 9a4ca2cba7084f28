"""Real data by a params switch: data/real/dvc.yaml, `dvc import-url` of a Task09-style tar (extraction: test_archive.py)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_switching_data_root_to_an_imported_task09_archive_preprocesses_it(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MPLBACKEND": "Agg"}

    def run(*cmd, cwd):
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    # A Task09-style archive (Task09_Spleen/dataset.json, imagesTr/, labelsTr/) made from the phantom.
    # 4 volumes: 3 labelled (one each for train, val and test; preprocessing refuses an empty
    # validation split) and 1 unlabelled in imagesTs.
    build = tmp_path / "build"
    run(f"{bin_dir}/unet3plus", "synth", "--layout", "msd-spleen", "--out", str(build / "Task09_Spleen"),
        "--cases", "4", "--size", "48", "--slices", "12", cwd=tmp_path)
    with tarfile.open(tmp_path / "Task09_Spleen.tar", "w") as tar:
        tar.add(build / "Task09_Spleen", arcname="Task09_Spleen")

    repo = tmp_path / "repo"
    (repo / "data" / "real").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "data" / "real" / "dvc.yaml", repo / "data" / "real" / "dvc.yaml")
    shutil.copytree(ROOT / "unet3plus", repo / "unet3plus", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "reports" / "ablations").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"root": "data/real", "size": 32, "workers": 1, "test_fraction": 0.34})
    params["ablations"]["run"] = []
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "--quiet", cwd=repo)
    run(f"{bin_dir}/dvc", "init", "--quiet", cwd=repo)
    run(f"{bin_dir}/dvc", "import-url", str(tmp_path / "Task09_Spleen.tar"), "data/real/Task09_Spleen.tar", cwd=repo)
    run(f"{bin_dir}/dvc", "repro", "preprocess@spleen", cwd=repo)

    manifest = pd.read_csv(repo / "data" / "processed" / "spleen" / "manifest.csv")
    labelled = json.loads((repo / "data" / "real" / "spleen" / "dataset.json").read_text())["training"]
    assert manifest["case_id"].nunique() == len(labelled) >= 3
    assert set(manifest.drop_duplicates("case_id")["split"]) == {"train", "val", "test"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "data/real/spleen" in [dep["path"] for dep in lock["preprocess@spleen"]["deps"]]
    assert "synth@spleen" not in lock  # the phantom is not made when real data is selected
    real_lock = yaml.safe_load((repo / "data" / "real" / "dvc.lock").read_text())["stages"]
    assert "Task09_Spleen.tar" in [dep["path"] for dep in real_lock["spleen"]["deps"]]
