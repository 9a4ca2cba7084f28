"""The 8-writer load of a parallel ablation study against one MLflow server: PostgreSQL vs SQLite behind it.

Both servers run the same way (``mlflow server --app-name basic-auth``, artifact proxy, one worker,
auth cache on); only the backend store differs: PostgreSQL (tracking and auth databases, as in
``deploy/mlflow``) or SQLite files. Against each, ``--writers`` tiny trainings (width 4, 32 px,
2 epochs, system metrics every second) run at once, forked from one interpreter; the script
reports the wall time of the load, the MLflow API requests in the server's access log, and
checks that nothing was lost or duplicated (every run FINISHED, every epoch's metrics logged
exactly once with the local value, the artifacts present). The backends take turns, ``--rounds``
times each, and the medians are reported with their ratio.

Usage: ``python benchmarks/bench_tracking_server.py [--writers 8] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch

from unet3plus.config import DataConfig
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.tracking_server import AUTH_DATABASE, MlflowServer, Postgres, request_count, run_concurrently

TINY = ["model.width=4", "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=2", "train.num_workers=0",
        "train.optimizer=sgd", "mlflow.experiment=load", "mlflow.system_metrics=true"]  # fmt: skip
PASSWORD = "bench-admin-password"


def lost_or_duplicated(url: str, outputs: list[Path]) -> list[str]:
    """Problems found in the runs the trainings in ``outputs`` logged (empty: nothing lost or duplicated)."""
    client, problems = mlflow.MlflowClient(url), []
    for out in outputs:
        run_id = pd.read_json(out / "train_summary.json", typ="series")["mlflow_run_id"]
        if run_id is None:
            problems.append(f"{out}: no run (tracking failed at start; the training went offline)")
            continue
        run = client.get_run(run_id)
        history = pd.read_csv(out / "history.csv")
        if run.info.status != "FINISHED":
            problems.append(f"{out}: run {run.info.status}")
        for key in ("loss", "val_dice", "lr"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if logged != list(zip(history.epoch, history[key])):
                problems.append(f"{out}: {key} logged {logged}")
        if not {"config.yaml", "history.csv", "curves.png", "train_summary.json"} <= {
            a.path for a in client.list_artifacts(run_id)
        }:
            problems.append(f"{out}: artifacts missing")
        if not any(key.startswith("system/") for key in run.data.metrics):
            problems.append(f"{out}: no system metrics")
    return problems


def load(backend: str, root: Path, data: Path, writers: int) -> dict[str, object]:
    """Start a server on ``backend``, run the load, check it, stop the server."""
    postgres = None
    if backend == "postgresql":
        postgres = Postgres(root / "pg")
        postgres.start()
        store, auth = postgres.uri(), postgres.uri(AUTH_DATABASE)
    else:
        store, auth = f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'auth.db'}"
    server = MlflowServer(root / "server", store, auth_database_uri=auth, admin_password=PASSWORD)
    server.start()
    try:
        before = request_count(server.log)
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": PASSWORD, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
               "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        outputs = [root / "out" / str(i) for i in range(writers)]
        commands = [["train", "--data", str(data), "--out", str(out), *[a for s in [*TINY, f"train.seed={i}"]
                     for a in ("--set", s)]] for i, out in enumerate(outputs)]  # fmt: skip
        started = time.perf_counter()
        result = run_concurrently(commands, root, env)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        requests = request_count(server.log) - before
        os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
        problems = lost_or_duplicated(server.url, outputs)
    finally:
        server.stop()
        if postgres is not None:
            postgres.stop()
    warnings = sorted({line for line in result.stderr.splitlines() if "MLflow tracking failed" in line})
    return {"seconds": seconds, "requests": requests, "problems": problems, "warnings": warnings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    # Outside root-only folders: under root, PostgreSQL runs as another user.
    base = Path(tempfile.mkdtemp(prefix="unet3plus-bench-"))
    base.chmod(0o711)
    try:
        write_dataset("lits", base / "raw", cases=4, seed=0, size=48, slices=10)
        preprocess_dataset("lits", base / "raw", base / "data", DataConfig(size=32, val_fraction=0.34, workers=1))
        results: dict[str, list[dict[str, object]]] = {"postgresql": [], "sqlite": []}
        for round_ in range(args.rounds):
            for backend in results:
                results[backend].append(load(backend, base / f"{backend}-{round_}", base / "data", args.writers))
                print(backend, round_, results[backend][-1], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{datetime.date.today()}, {platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}, "
          f"mlflow {mlflow.__version__}, load average {os.getloadavg()[0]:.1f}, {args.writers} writers, "
          f"{args.rounds} rounds")  # fmt: skip
    print("| backend | wall s (median) | requests (median) | lost or duplicated |\n|---|---|---|---|")
    medians = {}
    for backend, rounds in results.items():
        medians[backend] = statistics.median(r["seconds"] for r in rounds)
        requests = statistics.median(r["requests"] for r in rounds)
        problems = sum(len(r["problems"]) for r in rounds)
        print(f"| {backend} | {medians[backend]:.1f} | {requests:.0f} | {problems or 'nothing'} |")
    print(f"\nwall time PostgreSQL / SQLite: {medians['postgresql'] / medians['sqlite']:.2f}")


if __name__ == "__main__":
    main()
