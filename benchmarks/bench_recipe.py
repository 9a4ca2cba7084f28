"""Is the default recipe robust? Train and evaluate the default grid over seeds x thread counts.

The default grid is what ``dvc repro`` trains: per organ (liver, spleen: the synthetic phantoms of
``params.yaml``'s data section) the main model and every variant of ``ablations.run``. Each
(organ, model) is trained with every seed (``train.seed``: weights, sampling order and
augmentations) and every torch thread count (a different thread count changes the float reduction
order, as a different CPU does), then evaluated on the test volumes. Per pair it reports the
minimum, mean, sample standard deviation and maximum of the test Dice, and whether the targets of
issue 16 hold (min >= 0.80, std <= 0.03).

Runs are independent processes with their own MLflow store, so they can run side by side: as many
at once as fit in ``--cores`` (a 2-thread run alone on 2 cores, two 1-thread runs together). The
benchmark is resumable: every finished run is kept in the JSON (``--json``) with a hash of the
recipe it trained (every params section that changes a run's result), and a rerun skips the runs
whose recipe did not change. At the end the summary goes to the JSON and to the section of
``benchmarks/RESULTS.md`` between the ``bench_recipe`` markers.

    nohup python benchmarks/bench_recipe.py --seeds 0 1 2 --threads 1 2 &     # the full benchmark
    python benchmarks/bench_recipe.py --organs spleen --models main --seeds 0  # one run
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ORGANS = {"liver": "lits", "spleen": "msd-spleen"}
MIN_DICE, MAX_STD = 0.80, 0.03  # issue 16's targets per (organ, model)
BEGIN, END = "<!-- bench_recipe:begin -->", "<!-- bench_recipe:end -->"
COST = {"main": 4, "unet3plus_no_ds": 3, "unet2plus": 3, "unet": 1}  # relative CPU time, to start long runs first
RECIPE_SECTIONS = ("data", "model", "loss", "train", "evaluate")

logger = logging.getLogger("bench_recipe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="the recipe (default params.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default 0 1 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--organs", nargs="+", default=list(ORGANS), choices=list(ORGANS))
    parser.add_argument("--models", nargs="+", default=None, help="main and/or variants (default: main + ablations.run)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="threads in use at once over all parallel runs (default: all cores)")
    parser.add_argument("--work", default=str(HERE / ".recipe"), help="data, checkpoints, logs (default benchmarks/.recipe)")
    parser.add_argument("--json", default=str(HERE / "bench_recipe.json"), help="runs and summary (default benchmarks/bench_recipe.json)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file with the bench_recipe markers")
    parser.add_argument("--one", nargs=4, metavar=("ORGAN", "MODEL", "SEED", "THREADS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def recipe_hash(config: Any) -> str:
    """Hash of what decides a run's result: every params section that does (not tracking, not the ablations
    not run) and the source of the ``unet3plus`` package (a code change is a new recipe too)."""
    import unet3plus

    payload = {section: config.to_dict()[section] for section in RECIPE_SECTIONS}
    payload["train"] = {**payload["train"], "seed": None}
    payload["variants"] = {a.name: a.overrides for a in config.ablations.selected()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    package = Path(unet3plus.__file__).parent
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def prepare_data(config: Any, work: Path) -> None:
    """The synthetic phantoms and their preprocessed samples, as ``dvc repro`` makes them (skipped when present)."""
    from unet3plus.data.phantom import write_dataset
    from unet3plus.data.preprocess import preprocess_dataset

    data = config.data
    for organ, layout in ORGANS.items():
        raw, processed = work / "raw" / organ, work / "processed" / organ
        if not raw.is_dir():
            write_dataset(layout, raw, cases=data.synth_cases, seed=data.synth_seed, size=data.synth_size,
                          slices=data.synth_slices)
        preprocess_dataset(layout, raw, processed, data)  # a no-op when unchanged


def run_one(params: str, work: Path, organ: str, model: str, seed: int, threads: int) -> dict[str, Any]:
    """Train and evaluate one (organ, model, seed, threads) in this process; returns its record."""
    import torch

    from unet3plus.config import ablation_config, load_config
    from unet3plus.evaluate import evaluate
    from unet3plus.train import train

    torch.set_num_threads(threads)
    name = f"{organ}-{model}-s{seed}-t{threads}"
    store = work / "mlflow" / f"{name}.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    store.unlink(missing_ok=True)
    base = load_config(params, [f"train.seed={seed}", f"mlflow.tracking_uri=sqlite:///{store}",
                                "mlflow.system_metrics=false", "evaluate.overlays=0"])
    config = base if model == "main" else ablation_config(base, base.ablations.get(model))
    data, out = work / "processed" / organ, work / "runs" / name
    started, cpu = time.perf_counter(), time.process_time()
    summary = train(config, data, out / "model", force=True, ablation=model, base=base)
    train_seconds, train_cpu = time.perf_counter() - started, time.process_time() - cpu
    metrics = evaluate(config, out / "model" / "best.pt", data, work / "raw" / organ, out / "evaluation", force=True)
    with open(out / "model" / "history.csv", newline="") as history:
        val = [round(float(row["val_dice"]), 4) for row in csv.DictReader(history)]
    # The recipe as main() hashes it (params alone): the overrides above are the benchmark's, not the recipe's.
    return {"organ": organ, "model": model, "seed": seed, "threads": threads, "recipe": recipe_hash(load_config(params)),
            "test_dice": metrics["dice"], "best_val_dice": summary["best_val_dice"], "best_epoch": summary["best_epoch"],
            "val_dice": val, "train_seconds": round(train_seconds, 1), "train_cpu_seconds": round(train_cpu, 1),
            "finished": datetime.now(UTC).isoformat(timespec="seconds")}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (organ, model): runs, min / mean / sample std / max test Dice, whether the targets hold."""
    rows = []
    for organ, model in sorted({(r["organ"], r["model"]) for r in runs}):
        dice = [r["test_dice"] for r in runs if (r["organ"], r["model"]) == (organ, model)]
        std = statistics.stdev(dice) if len(dice) > 1 else 0.0
        rows.append({"organ": organ, "model": model, "runs": len(dice), "min": min(dice), "mean": statistics.fmean(dice),
                     "std": std, "max": max(dice), "passes": min(dice) >= MIN_DICE and std <= MAX_STD})
    return rows


def markdown(payload: dict[str, Any]) -> str:
    """The RESULTS.md section: conditions, the per-pair table, and what each run cost."""
    conditions = (
        f"`python benchmarks/bench_recipe.py --seeds {' '.join(map(str, payload['seeds']))} --threads "
        f"{' '.join(map(str, payload['threads']))}` ({payload['date']}; {payload['cpu']}, {os.cpu_count()} cores, "
        f"torch {payload['torch']}; recipe {payload['recipe']}, {payload['recipe_text']}). Every (organ, model) of "
        f"the default grid trained with each seed and thread count ({len(payload['seeds'])} x "
        f"{len(payload['threads'])} runs), test Dice per volume on the phantoms' test split; std is the sample "
        f"standard deviation. Targets (issue 16): min >= {MIN_DICE:.2f} and std <= {MAX_STD:.2f}."
    )
    if not payload["complete"]:
        done = sorted(set(payload["done"]))
        conditions += (f" **Partial**: only the runs finished so far (n per row), from: "
                       f"{', '.join(f'seed {seed} x {threads} thread(s)' for seed, threads in done)}.")
    lines = [
        conditions,
        "",
        "| organ | model | runs | min | mean | std | max | targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["summary"]:
        lines.append(f"| {row['organ']} | {row['model']} | {row['runs']} | {row['min']:.3f} | {row['mean']:.3f} | "
                     f"{row['std']:.3f} | {row['max']:.3f} | {'met' if row['passes'] else '**missed**'} |")
    cpu: dict[tuple[str, str], list[float]] = {}
    for run in payload["runs"].values():
        if run["threads"] == 1:
            cpu.setdefault((run["organ"], run["model"]), []).append(run["train_cpu_seconds"])
    if cpu:
        lines += ["", "Training CPU seconds of the 1-thread runs (median per pair; the machine was shared, so these "
                  "are upper bounds): " + ", ".join(f"{organ} {model} {statistics.median(values):.0f}"
                                                    for (organ, model), values in sorted(cpu.items())) + "."]
    return "\n".join(lines) + "\n"


def write_results_section(path: Path, section: str) -> None:
    """Replace the text between the markers of ``path`` (appended with a heading when absent)."""
    from unet3plus.utils import write_text_atomic

    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{section}{END}{rest.split(END, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n## Training recipe robustness\n\n{BEGIN}\n{section}{END}\n"
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work).resolve()
    if args.one:
        organ, model, seed, threads = args.one
        record = run_one(args.params, work, organ, model, int(seed), int(threads))
        from unet3plus.utils import write_json_atomic

        write_json_atomic(work / "results" / f"{organ}-{model}-s{seed}-t{threads}.json", record)
        return 0

    from unet3plus.config import load_config

    config = load_config(args.params)
    recipe = recipe_hash(config)
    models = args.models or ["main", *config.ablations.run]
    store = Path(args.json)
    payload = json.loads(store.read_text()) if store.is_file() else {"runs": {}}
    runs: dict[str, Any] = {key: run for key, run in payload["runs"].items() if run["recipe"] == recipe}
    prepare_data(config, work)
    jobs = [(organ, model, seed, threads) for organ in args.organs for model in models for seed in args.seeds
            for threads in args.threads]
    todo = [job for job in jobs if "{}-{}-s{}-t{}".format(*job) not in runs]
    # Every seed at the first thread count, then each further thread count seed by seed; long runs first
    # within each group, so the tail is short. Stopped early, the summary then covers whole seeds.
    def order(job: tuple[str, str, int, int]) -> tuple[int, int, int]:
        position = args.threads.index(job[3])
        return position, job[2] if position else 0, -COST.get(job[1], 2)

    todo.sort(key=order)
    logger.info("recipe %s: %d of %d runs cached, %d to go", recipe, len(jobs) - len(todo), len(jobs), len(todo))
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    while todo or running:
        for job in list(todo):
            used = sum(threads for _, threads in running.values())
            if used == 0 or used + job[3] <= args.cores:
                key = "{}-{}-s{}-t{}".format(*job)
                (work / "results" / f"{key}.json").unlink(missing_ok=True)
                # Passive waiting: on a shared machine spinning OpenMP threads stall each other (results are
                # the same either way; only the wall time changes).
                env = {**os.environ, "OMP_NUM_THREADS": str(job[3]), "MKL_NUM_THREADS": str(job[3]),
                       "OMP_WAIT_POLICY": "PASSIVE"}
                with open(work / "logs" / f"{key}.log", "w") as log:
                    command = [sys.executable, __file__, "--params", args.params, "--work", str(work), "--one", *map(str, job)]
                    running[key] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), job[3])
                todo.remove(job)
                logger.info("started %s", key)
            elif job[3] > 1:
                break  # a multi-thread run waits for the cores to free up; nothing behind it jumps the queue
        time.sleep(2)
        for key, (process, _) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            result = work / "results" / f"{key}.json"
            if process.returncode != 0 or not result.is_file():
                logger.error("%s failed (exit %s); see %s", key, process.returncode, work / "logs" / f"{key}.log")
                continue
            runs[key] = json.loads(result.read_text())
            logger.info("%s: test Dice %.4f (val %s)", key, runs[key]["test_dice"], runs[key]["val_dice"])
            payload = publish(args, config, payload, runs, jobs)
    payload = publish(args, config, payload, runs, jobs)
    for row in payload["summary"]:
        logger.info("%-6s %-16s n=%d min %.3f mean %.3f std %.3f %s", row["organ"], row["model"], row["runs"], row["min"],
                    row["mean"], row["std"], "ok" if row["passes"] else "MISSED")
    return 0 if all(row["passes"] for row in payload["summary"]) and payload["complete"] else 1


def publish(args: argparse.Namespace, config: Any, payload: dict[str, Any], runs: dict[str, Any],
            jobs: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    """Write the JSON (every run kept, the summary of this grid's finished runs) and the RESULTS.md section."""
    import torch

    from unet3plus.device import cpu_name
    from unet3plus.utils import write_json_atomic

    done = [runs[key] for key in ("{}-{}-s{}-t{}".format(*job) for job in jobs) if key in runs]
    payload = {
        "runs": {**payload["runs"], **runs}, "recipe": recipe_hash(config), "seeds": args.seeds, "threads": args.threads,
        "date": datetime.now(UTC).date().isoformat(), "cpu": cpu_name(), "torch": torch.__version__,
        "recipe_text": recipe_text(config), "summary": summarise(done), "complete": len(done) == len(jobs),
        "done": sorted((run["seed"], run["threads"]) for run in done),
    }
    write_json_atomic(Path(args.json), payload)
    write_results_section(Path(args.results), markdown(payload))
    return payload


def recipe_text(config: Any) -> str:
    """The recipe in one phrase, for the RESULTS.md section."""
    t, d, m = config.train, config.data, config.model
    return (f"{d.size} px, width {m.width}, {t.optimizer} lr {t.lr:g} ({t.schedule}, {t.warmup_epochs:g} warm-up "
            f"epoch(s)), batch {t.batch_size}, {t.epochs} epochs, organ_fraction {t.organ_fraction:g}")


if __name__ == "__main__":
    sys.exit(main())
