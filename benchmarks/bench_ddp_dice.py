"""Two-process CPU training through the train component reaches the validation Dice of one process.

The default phantom (``params.yaml``'s ``data.synth_*``) is synthesised and preprocessed, then
``components.train.train_model`` trains it twice from the same seed: one process with batch 2B,
and ``nproc=2`` (torchrun, gloo) with batch B per process, i.e. the same global batch. Prints the
best validation Dice of each and their difference (the acceptance bound is 0.02).

    python benchmarks/bench_ddp_dice.py --epochs 4 --size 64 --width 8 --batch 4
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from kfp import dsl

from components import preprocess_data, raw_data, train_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="data.size (the phantom itself is the default one)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="per process with 2 processes; 2x with one")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(size=args.size, workers=1)
    params["model"]["width"] = args.width
    params["train"].update(epochs=args.epochs, num_workers=0, device="cpu")
    params["mlflow"]["system_metrics"] = False
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
        text = yaml.safe_dump(params)
        raw = dsl.Dataset(name="raw", uri=str(root / "raw"), metadata={})
        raw_data.python_func(raw=raw, dataset="liver", params=text)
        processed = dsl.Dataset(name="processed", uri=str(root / "processed"), metadata={})
        preprocess_data.python_func(raw=raw, processed=processed, dataset="liver", params=text)
        results = {}
        for nproc, batch in ((1, 2 * args.batch), (2, args.batch)):
            started = time.perf_counter()
            model = dsl.Model(name="model", uri=str(root / f"model{nproc}"), metadata={})
            metrics = dsl.Metrics(name="metrics", uri=str(root / f"metrics{nproc}"), metadata={})
            dice = train_model.python_func(processed=processed, model=model, metrics=metrics, params=text,
                                           overrides=[f"train.batch_size={batch}"], nproc=nproc)
            results[nproc] = {"best_val_dice": dice, "global_batch": nproc * batch,
                              "seconds": time.perf_counter() - started}
        results["difference"] = abs(results[1]["best_val_dice"] - results[2]["best_val_dice"])
        print(json.dumps({"settings": vars(args), **{str(k): v for k, v in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
