"""The ``unet3plus`` command: one verb per pipeline step, each a thin shell over the library.

Every verb reads ``--params params.yaml`` (defaults when the file is absent and not asked for)
and any number of ``--set section.key=value`` overrides. Errors the user can fix are printed as
one paragraph and exit with status 2; nothing is written when the input is bad.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from unet3plus.config import LAYOUTS, Config, load_config, params_path
from unet3plus.errors import DataError, UserError
from unet3plus.utils import check_files_replaceable, check_outputs, record_outputs, redact, setup_logging

logger = logging.getLogger("unet3plus")

EPILOG = "Configuration: every knob lives in params.yaml; override any with --set section.key=value."


def _config(args: argparse.Namespace) -> Config:
    return load_config(params_path(args.params), args.overrides, getattr(args, "ablation", None))


def cmd_synth(args: argparse.Namespace) -> None:
    from unet3plus.data.phantom import render_preview, write_dataset

    data = _config(args).data
    check_outputs({"--out": args.out, "--preview": args.preview}, {"--params": params_path(args.params)})
    check_files_replaceable("--preview", [args.preview], args.force)
    written = write_dataset(
        args.layout,
        args.out,
        cases=args.cases if args.cases is not None else data.synth_cases,
        seed=args.seed if args.seed is not None else data.synth_seed,
        size=args.size if args.size is not None else data.synth_size,
        slices=args.slices if args.slices is not None else data.synth_slices,
        force=args.force,
        fov_range=tuple(args.fov_range),
    )
    logger.info("wrote %d synthetic %s cases to %s", len(written), args.layout, args.out)
    if args.preview:
        render_preview(args.layout, args.out, args.preview)
        record_outputs(args.preview.parent, [args.preview])
        logger.info("preview written to %s", args.preview)


def cmd_validate(args: argparse.Namespace) -> None:
    from unet3plus.data.validation import validate_dataset
    from unet3plus.utils import write_json_atomic

    config = _config(args)
    check_outputs({"--report": args.report}, {"--raw": args.raw, "--params": params_path(args.params)})
    check_files_replaceable("--report", [args.report], args.force)
    report = validate_dataset(args.layout, args.raw, workers=config.data.workers)
    for warning in report.warnings:
        logger.warning("%s", warning)
    if args.report:
        write_json_atomic(args.report, report.to_dict())
        record_outputs(args.report.parent, [args.report])
    if report.errors:
        raise DataError(f"{args.raw}: {len(report.errors)} problem(s) found:\n  " + "\n  ".join(report.errors))
    logger.info("%s: %d cases valid (%d warnings)", args.raw, report.cases, len(report.warnings))


def cmd_preprocess(args: argparse.Namespace) -> None:
    from unet3plus.data.preprocess import preprocess_dataset

    config = _config(args)
    if args.size is not None:
        config.data.size = args.size
        config.data.validate()
    check_outputs({"--out": args.out}, {"--raw": args.raw, "--params": params_path(args.params)})
    manifest = preprocess_dataset(args.layout, args.raw, args.out, config.data)
    logger.info("manifest: %s", manifest)


def cmd_train(args: argparse.Namespace) -> None:
    from unet3plus.train import train

    config = _config(args)
    check_outputs({"--out": args.out}, {"--data": args.data, "--params": params_path(args.params)})
    base = _config(argparse.Namespace(**{**vars(args), "ablation": None}))
    train(config, data_dir=args.data, out_dir=args.out, resume=args.resume, force=args.force,
          compile_model=args.compile, ablation=args.ablation or "main", base=base)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from unet3plus.evaluate import evaluate

    config = _config(args)
    check_outputs({"--out": args.out}, {"--checkpoint": args.checkpoint, "--data": args.data, "--raw": args.raw,
                                        "--params": params_path(args.params)})
    evaluate(config, checkpoint=args.checkpoint, data_dir=args.data, raw_dir=args.raw, out_dir=args.out, force=args.force)


def cmd_register(args: argparse.Namespace) -> None:
    from unet3plus.register import register
    from unet3plus.utils import write_json_atomic

    config = _config(args)
    check_outputs({"--output": args.output}, {"--checkpoint": args.checkpoint, "--metrics": args.metrics,
                                              "--params": params_path(args.params)})
    check_files_replaceable("--output", [args.output], args.force)
    result = register(config, checkpoint=args.checkpoint, metrics_path=args.metrics)  # logs the alias and why
    if args.output:
        write_json_atomic(args.output, result)
        record_outputs(args.output.parent, [args.output])


def cmd_report(args: argparse.Namespace) -> None:
    from unet3plus.report import collect_runs, configuration_table, report_markdown, report_outputs, write_report

    config = _config(args)
    if args.out is None:
        collected = collect_runs(config)
        sys.stdout.write(report_markdown(configuration_table(collected), collected.studies))
        return
    files, plots = report_outputs(args.out)
    for path in (*files, plots):
        check_outputs({"--out": path}, {"--readme": args.readme, "--spread": args.spread, "--params": params_path(args.params)})
    check_files_replaceable("--out", files, args.force, folders=[plots])
    write_report(config, args.out, readme=args.readme, spread=args.spread)


def cmd_extract(args: argparse.Namespace) -> None:
    from unet3plus.data.archive import MAX_BYTES, extract_dataset

    check_outputs({"--out": args.out}, {"--archive": args.archive, "--params": params_path(args.params)})
    extract_dataset(args.archive, args.out, max_bytes=args.max_size or MAX_BYTES)


def cmd_predict(args: argparse.Namespace) -> None:
    from unet3plus.predict import is_mlflow_uri, predict_file, predict_folder

    config = _config(args)
    model = None if is_mlflow_uri(args.model) else args.model
    check_outputs({"--output": args.output}, {"--input": args.input, "--model": model, "--params": params_path(args.params)})
    if not args.input.is_dir():
        check_files_replaceable("--output", [args.output], args.force)
        predict_file(args.model, args.input, args.output, config=config)
        record_outputs(args.output.parent, [args.output])
        return
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"{args.output}: --input is a folder, so --output must be a folder too (this is a file)")
    failures = predict_folder(args.model, args.input, args.output, config=config)
    if failures:
        raise DataError(f"{args.input}: {len(failures)} scan(s) failed, the others were segmented into {args.output}: "
                        + "; ".join(failures.values()))


def cmd_export(args: argparse.Namespace) -> None:
    from unet3plus.serving import export_model
    from unet3plus.tracking import configure_for_reading, store_errors

    config = _config(args)
    check_outputs({"--out": args.out}, {"--params": params_path(args.params)})
    configure_for_reading(config.mlflow)
    with store_errors(config.mlflow):
        export_model(args.model, args.out)


def _size(text: str) -> int:
    """``500M``, ``8G``, ``1024`` (bytes) -> bytes, for argparse."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 8G, got {text!r}")
    return int(value)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None,
                        help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one parameter, e.g. --set train.epochs=5 (repeatable; values are YAML)")
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

    ablation_help = ("train/evaluate the variant NAME of ablations.variants (its overrides applied to the main "
                     "configuration; the MLflow run is tagged ablation=NAME)")
    layout_help = ("raw data layout: 'lits' (LiTS 2017: volume-N.nii, segmentation-N.nii) or 'msd-spleen' "
                   "(Decathlon Task09: dataset.json, imagesTr/, labelsTr/)")

    p = verb("synth", cmd_synth, "write a synthetic CT phantom dataset in the LiTS or MSD layout",
             "Write seeded synthetic abdominal CT volumes (Hounsfield units, realistic spacing and affine) with liver "
             "or spleen labels, in the exact LiTS or MSD Task09 file layout, so every later step runs for real.")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help=layout_help)
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--cases", type=int, default=None, help="number of cases (default: data.synth_cases)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: data.synth_seed)")
    p.add_argument("--size", type=int, default=None, help="in-plane voxels, e.g. 128 or 512 (default: data.synth_size)")
    p.add_argument("--slices", type=int, default=None, help="slices per volume (default: data.synth_slices)")
    p.add_argument("--preview", type=Path, default=None, metavar="PNG",
                   help="also render a few axial slices with organ outlines to this PNG")
    p.add_argument("--force", action="store_true", help="replace --out even if it holds files synth did not write (they are deleted)")
    p.add_argument("--fov-range", type=float, nargs=2, default=(1.0, 1.0), metavar=("LOW", "HIGH"),
                   help="vary the field of view: each case shows the same kind of body in a field of view (and "
                   "pixel spacing) LOW to HIGH times larger, padded with air (default 1 1: the standard phantom)")

    p = verb("validate", cmd_validate, "check every raw case and report all problems at once",
             "Read every case of a raw dataset and list every problem (unreadable or truncated files, shape or affine "
             "mismatches, NaN, unexpected labels, empty volumes). Exits non-zero if any error is found.")
    p.add_argument("--layout", choices=LAYOUTS, required=True, help=layout_help)
    p.add_argument("--raw", type=Path, required=True, help="raw dataset directory")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="also write the findings to this JSON file")
    p.add_argument("--force", action="store_true", help="replace --report even if unet3plus did not write it (or it was edited since)")

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
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/last.pt with its settings (a changed model, train.* or loss.* setting is "
                   "refused, except train.epochs, train.device and train.num_workers)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (opt-in: off by default because it costs minutes of compilation "
                        "and was slower than eager on the official code; measure with benchmarks/gpu_check.py)")
    p.add_argument("--force", action="store_true", help="start afresh in an --out that holds an earlier run (its checkpoints are replaced)")
    p.add_argument("--ablation", default=None, metavar="NAME", help=ablation_help)

    p = verb("evaluate", cmd_evaluate, "score a checkpoint per 3D volume on the test split",
             "Predict every test volume, map predictions back to the original voxel grid and score Dice, IoU, "
             "precision, recall, HD95 and ASSD per volume, with and without the CGM gate. Writes metrics.json, "
             "per_case.csv, NIfTI predictions and overlay PNGs to --out.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to evaluate (e.g. models/liver/best.pt)")
    p.add_argument("--data", type=Path, required=True, help="preprocessed dataset directory")
    p.add_argument("--raw", type=Path, required=True, help="raw dataset directory (original labels and geometry)")
    p.add_argument("--out", type=Path, required=True, help="output directory for metrics and predictions")
    p.add_argument("--force", action="store_true", help="replace predictions/ and overlays/ even if they hold files evaluate did not write")
    p.add_argument("--ablation", default=None, metavar="NAME", help=ablation_help)

    p = verb("register", cmd_register, "log the model to MLflow and register it; move 'champion' only if earned",
             "Log the checkpoint as an MLflow model (signature and input example) and register it as "
             "unet3plus-<dataset> (trained on real data) or unet3plus-<dataset>-synthetic (trained on the phantom). "
             "The 'champion' alias moves to it only when its test Dice is at least register.min_test_dice and beats "
             "the champion's on the same test set; otherwise it gets 'challenger', or no alias below the floor "
             "(exit 0 either way; the log says why). Running it again for the same checkpoint and metrics creates "
             "no second version.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to register")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json written by `evaluate`")
    p.add_argument("--output", type=Path, default=None, metavar="JSON", help="also write the registered name, version, alias and why here")
    p.add_argument("--force", action="store_true", help="replace --output even if unet3plus did not write it (or it was edited since)")

    p = verb("predict", cmd_predict, "segment CT volumes (NIfTI in, NIfTI mask out): one scan or a whole folder",
             "Segment whole CT volumes with a registered model (models:/unet3plus-liver@champion) or a checkpoint "
             "file; each mask is written in its scan's original geometry and affine. The preprocessing and the "
             "threshold are the model's own; it runs on the GPU when there is one (evaluate.device). With a folder "
             "as --input, every .nii / .nii.gz in it is segmented (progress bar) into --output/<scan>.nii.gz plus "
             "--output/volumes.csv (scan, organ_voxels, organ_volume_ml); a bad scan is reported in one line and "
             "skipped, the others finish, and the exit status is 2 when any failed.")
    p.add_argument("--model", required=True, help="MLflow model URI (models:/NAME@ALIAS, runs:/...) or checkpoint path")
    p.add_argument("--input", type=Path, required=True, help="CT volume (.nii or .nii.gz) or a folder of them")
    p.add_argument("--output", type=Path, required=True, help="mask to write (.nii.gz), or a folder for a folder --input")
    p.add_argument("--force", action="store_true", help="replace a one-scan --output even if unet3plus did not write it "
                   "(or it was edited since)")

    p = verb("export", cmd_export, "copy a registered model to a folder that MLflow serving or KServe reads",
             "Download a registered model (e.g. models:/unet3plus-liver@champion) from the tracking server into a new "
             "folder: MLmodel, the unet3plus code, the weights and requirements. `mlflow models serve -m DIR` serves "
             "it; copy DIR to the volume or bucket that deploy/serving/ InferenceServices read (see README, Serving).")
    p.add_argument("--model", required=True, help="registered model URI, models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")

    p = verb("extract", cmd_extract, "safely unpack a downloaded dataset archive (MSD Task09_Spleen.tar)",
             "Extract a tar archive with Python's 'data' filter (no absolute paths, no '..', no links outside, no "
             "device files) into --out, unwrapping its single top-level folder. Used by data/real/dvc.yaml.")
    p.add_argument("--archive", type=Path, required=True, help="the .tar (or .tar.gz) file")
    p.add_argument("--out", type=Path, required=True, help="raw dataset folder to create (must not exist or be empty)")
    p.add_argument("--max-size", type=_size, default=None, metavar="SIZE",
                   help="refuse an archive that unpacks to more than this, e.g. 500M or 20G (default: 8G); free space "
                   "is checked too, before anything is written")

    p = verb("report", cmd_report, "the ablation study's tables and plots, read back from MLflow",
             "Collect, per organ, the training runs of the newest study of these parameters (params.yaml and --set; "
             "a study is an organ, a data hash and the model/loss/train settings, seeds aside) from MLflow: a row for "
             "the main model and every name of ablations.run (its result, FAILED with the error, or 'not run'), in "
             "the paper's Table 1 (model x encoder: parameters, test Dice per organ) and Table 2 "
             "(UNet 3+ by loss and CGM, with the CGM's ROC AUC / AP and false positives on organ-free slices), mean "
             "+/- spread over seeds. The report names each study shown and never mixes two.")
    p.add_argument("--out", type=Path, default=None, metavar="MD",
                   help="write the markdown here, with .csv and .json beside it and plots in <stem>_plots/ "
                   "(default: print the markdown)")
    p.add_argument("--readme", type=Path, default=None, metavar="README",
                   help="also rewrite the results block between the markers of this README (with --out)")
    p.add_argument("--spread", type=Path, default=None, metavar="JSON",
                   help="with --readme: show the test Dice spread over seeds and threads that benchmarks/bench_recipe.py "
                   "measured (benchmarks/bench_recipe.json) beside the table, and whether the order is the paper's")
    p.add_argument("--force", action="store_true",
                   help="replace the report's files and plots even if unet3plus did not write it (or it was edited since)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command line (``args.func`` with ``args.verbose``); the one error convention.

    A :class:`UserError` becomes one ``error: ...`` paragraph on stderr and exit status 2, and so
    does a file-system error (naming the path); Ctrl-C prints ``interrupted`` and exits 130 (the
    traceback only with ``-v``). Anything else is a bug and propagates.
    """
    setup_logging(args.verbose)
    try:
        args.func(args)
    except KeyboardInterrupt:
        logger.debug("interrupted", exc_info=True)
        print("interrupted", file=sys.stderr)
        # Objects the interrupt left half-way (an .npz being read) may fail to close when collected
        # at exit and print "Exception ignored ... Traceback"; the user asked to stop, so stay quiet.
        sys.unraisablehook = lambda unraisable: None
        return 130
    except (UserError, OSError) as err:
        logger.debug("error details", exc_info=True)
        print(f"error: {redact(_describe(err))}", file=sys.stderr)
        return 2
    return 0


def _describe(err: Exception) -> str:
    """The message of a :class:`UserError`; ``path: reason`` of a file-system error."""
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror:
        paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
        return f"{paths}: {err.strerror}" if paths else err.strerror
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
