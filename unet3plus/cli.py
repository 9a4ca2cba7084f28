"""The ``unet3plus`` command: one verb per pipeline step, each a thin shell over the library.

Every verb reads ``--params params.yaml`` (defaults when the file is absent and not asked for)
and any number of ``--set section.key=value`` overrides. Errors the user can fix are printed as
one paragraph and exit with status 2; nothing is written when the input is bad.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from unet3plus.config import LAYOUTS, Config, load_config
from unet3plus.errors import DataError, UserError
from unet3plus.utils import setup_logging

logger = logging.getLogger("unet3plus")

EPILOG = "Configuration: every knob lives in params.yaml; override any with --set section.key=value."


def _config(args: argparse.Namespace) -> Config:
    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = "params.yaml"
    return load_config(params, args.overrides)


def cmd_synth(args: argparse.Namespace) -> None:
    from unet3plus.data.phantom import render_preview, write_dataset

    data = _config(args).data
    written = write_dataset(
        args.layout,
        args.out,
        cases=args.cases if args.cases is not None else data.synth_cases,
        seed=args.seed if args.seed is not None else data.synth_seed,
        size=args.size if args.size is not None else data.synth_size,
        slices=args.slices if args.slices is not None else data.synth_slices,
    )
    logger.info("wrote %d synthetic %s cases to %s", len(written), args.layout, args.out)
    if args.preview:
        render_preview(args.layout, args.out, args.preview)
        logger.info("preview written to %s", args.preview)


def cmd_validate(args: argparse.Namespace) -> None:
    from unet3plus.data.validation import validate_dataset
    from unet3plus.utils import write_json_atomic

    report = validate_dataset(args.layout, args.raw, workers=_config(args).data.workers)
    for warning in report.warnings:
        logger.warning("%s", warning)
    if args.report:
        write_json_atomic(args.report, report.to_dict())
    if report.errors:
        raise DataError(f"{args.raw}: {len(report.errors)} problem(s) found:\n  " + "\n  ".join(report.errors))
    logger.info("%s: %d cases valid (%d warnings)", args.raw, report.cases, len(report.warnings))


def cmd_preprocess(args: argparse.Namespace) -> None:
    from unet3plus.data.preprocess import preprocess_dataset

    config = _config(args)
    if args.size is not None:
        config.data.size = args.size
        config.data.validate()
    manifest = preprocess_dataset(args.layout, args.raw, args.out, config.data)
    logger.info("manifest: %s", manifest)


def cmd_train(args: argparse.Namespace) -> None:
    from unet3plus.train import train

    train(_config(args), data_dir=args.data, out_dir=args.out, resume=args.resume)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from unet3plus.evaluate import evaluate

    evaluate(_config(args), checkpoint=args.checkpoint, data_dir=args.data, raw_dir=args.raw, out_dir=args.out)


def cmd_register(args: argparse.Namespace) -> None:
    from unet3plus.register import register
    from unet3plus.utils import write_json_atomic

    result = register(_config(args), checkpoint=args.checkpoint, metrics_path=args.metrics)
    logger.info("registered %s version %s%s", result["name"], result["version"], " (champion)" if result["champion"] else "")
    if args.output:
        write_json_atomic(args.output, result)


def cmd_report(args: argparse.Namespace) -> None:
    from unet3plus.report import results_table, to_markdown
    from unet3plus.utils import atomic_path, write_text_atomic

    table = results_table(_config(args).mlflow)
    if args.out is None:
        sys.stdout.write(to_markdown(table))
    elif args.out.suffix == ".csv":
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
    else:
        write_text_atomic(args.out, to_markdown(table))
    if args.out is not None:
        logger.info("%d configuration(s) written to %s", len(table), args.out)


def cmd_predict(args: argparse.Namespace) -> None:
    from unet3plus.predict import predict_file

    predict_file(args.model, args.input, args.output, config=_config(args))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None, help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one parameter, e.g. --set train.epochs=5 (repeatable; values are YAML)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet3plus",
        description="UNet 3+ (Huang et al., ICASSP 2020) for liver and spleen CT: synthesise or read data, "
        "preprocess, train, evaluate and register models tracked in MLflow.",
        epilog="Typical flow: synth -> validate -> preprocess -> train -> evaluate -> register "
        "(`dvc repro` runs all of it). " + EPILOG,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Callable[[argparse.Namespace], None], help_text: str, description: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=description, epilog=EPILOG)
        _add_common(sub)
        sub.set_defaults(func=func)
        return sub

    layout_help = "raw data layout: 'lits' (LiTS 2017: volume-N.nii, segmentation-N.nii) or 'msd-spleen' (Decathlon Task09: dataset.json, imagesTr/, labelsTr/)"

    p = verb("synth", cmd_synth, "write a synthetic CT phantom dataset in the LiTS or MSD layout",
             "Write seeded synthetic abdominal CT volumes (Hounsfield units, realistic spacing and affine) with liver "
             "or spleen labels, in the exact LiTS or MSD Task09 file layout, so every later step runs for real.")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help=layout_help)
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default: data.synth_cases)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: data.synth_seed)")
    p.add_argument("--size", type=int, default=None, help="in-plane voxels, e.g. 128 or 512 (default: data.synth_size)")
    p.add_argument("--slices", type=int, default=None, help="slices per volume (default: data.synth_slices)")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG", help="also render a few axial slices with organ outlines to this PNG")

    p = verb("validate", cmd_validate, "check every raw case and report all problems at once",
             "Read every case of a raw dataset and list every problem (unreadable or truncated files, shape or affine "
             "mismatches, NaN, unexpected labels, empty volumes). Exits non-zero if any error is found.")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help=layout_help)
    p.add_argument("--raw", type=Path, required=True, help="raw dataset directory")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="also write the findings to this JSON file")

    p = verb("preprocess", cmd_preprocess, "turn raw volumes into 3-slice .npz samples plus a manifest",
             "Validate, reorient, window HU to [0, 1], stack (previous, current, next) slices, resize to --size and "
             "write one .npz per slice plus manifest.csv with deterministic train/val/test splits. Re-running on "
             "unchanged input does nothing.")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help=layout_help)
    p.add_argument("--raw", type=Path, required=True, help="raw dataset directory")
    p.add_argument("--out", type=Path, required=True, help="output directory for samples and manifest")
    p.add_argument("--size", type=int, default=None, help="sample size in pixels (default: data.size, 320 in the paper)")

    p = verb("train", cmd_train, "train a model on preprocessed data, tracked in MLflow",
             "Train the model described by the 'model', 'loss' and 'train' sections on a preprocessed dataset. Writes "
             "last.pt (every epoch, for --resume) and best.pt (best validation Dice) to --out and logs one MLflow run. "
             "Several GPUs (or CPU processes): `torchrun --standalone --nproc_per_node N -m unet3plus train ...` runs "
             "one process per GPU (DDP, SyncBatchNorm on GPUs); rank 0 alone validates, writes and logs, so the "
             "outputs are the same as with one process. batch_size is per process.")
    p.add_argument("--data", type=Path, required=True, help="preprocessed dataset directory (from `preprocess`)")
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoints and the run summary")
    p.add_argument("--resume", action="store_true", help="continue from --out/last.pt")

    p = verb("evaluate", cmd_evaluate, "score a checkpoint per 3D volume on the test split",
             "Predict every test volume, map predictions back to the original voxel grid and score Dice, IoU, "
             "precision, recall, HD95 and ASSD per volume, with and without the CGM gate. Writes metrics.json, "
             "per_case.csv, NIfTI predictions and overlay PNGs to --out.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to evaluate (e.g. models/liver/best.pt)")
    p.add_argument("--data", type=Path, required=True, help="preprocessed dataset directory")
    p.add_argument("--raw", type=Path, required=True, help="raw dataset directory (original labels and geometry)")
    p.add_argument("--out", type=Path, required=True, help="output directory for metrics and predictions")

    p = verb("register", cmd_register, "log the model to MLflow and register it; move 'champion' if better",
             "Log the checkpoint as an MLflow model (signature and input example), register it as "
             "unet3plus-<dataset> and move the 'champion' alias only when its test Dice beats the current champion's.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to register")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json written by `evaluate`")
    p.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write the registered name, version and champion flag here")

    p = verb("predict", cmd_predict, "segment one CT volume (NIfTI in, NIfTI mask out)",
             "Segment a whole CT volume with a registered model (models:/unet3plus-liver@champion) or a checkpoint "
             "file; the mask is written in the input's original geometry and affine.")
    p.add_argument("--model", required=True, help="MLflow model URI (models:/NAME@ALIAS, runs:/...) or checkpoint path")
    p.add_argument("--input", type=Path, required=True, help="CT volume, .nii or .nii.gz")
    p.add_argument("--output", type=Path, required=True, help="mask to write, .nii.gz")

    p = verb("report", cmd_report, "the paper's results table from MLflow: test Dice per model and organ",
             "Collect every evaluated run of the MLflow experiment (mlflow.experiment, MLFLOW_TRACKING_URI wins) into "
             "one table like the paper's Tables 1 and 2: a row per configuration (model, encoder, deep supervision, "
             "CGM, loss weights), per organ the mean test Dice and the number of runs.")
    p.add_argument("--out", type=Path, default=None, help="write the table here (.csv, else markdown); default: print markdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command line (``args.func`` with ``args.verbose``); the one error convention.

    A :class:`UserError` becomes one ``error: ...`` paragraph on stderr and exit status 2 (the
    traceback only with ``-v``); anything else is a bug and propagates.
    """
    setup_logging(args.verbose)
    try:
        args.func(args)
    except UserError as err:
        logger.debug("error details", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
