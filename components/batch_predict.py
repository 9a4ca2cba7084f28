"""Component: batch inference, every scan of a folder on a volume segmented by a registered model."""

from typing import NamedTuple

from components.common import component, start


@component
def batch_predict(
    params: str,
    input_dir: str,
    output_dir: str,
    model_uri: str = "models:/unet3plus-liver@champion",
    allow_failures: bool = False,
) -> NamedTuple("BatchPrediction", [("segmented", int), ("failed", int)]):
    """Segment every ``.nii`` / ``.nii.gz`` of ``input_dir`` into ``output_dir`` (``unet3plus predict --input DIR``).

    Writes ``<scan>.nii.gz`` per scan and ``volumes.csv`` (scan, organ_voxels, organ_volume_ml);
    both folders are paths on the volume the pipeline mounts. The model is loaded once, on the
    GPU when the pod has one; a scan that cannot be read is logged in one line and skipped.

    Args:
        params: text of ``params.yaml`` (``mlflow`` finds the registry; ``evaluate.device`` and
            ``evaluate.batch_size`` choose how the model runs; its preprocessing and threshold are its own).
        input_dir: folder of CT scans.
        output_dir: folder for the masks (created).
        model_uri: the registered model (``models:/NAME@ALIAS``) or a checkpoint path on the volume.
        allow_failures: succeed even when some scans failed (default: the step fails, after
            segmenting every other scan, naming the bad ones).

    Returns:
        ``(segmented, failed)``: how many scans got a mask, how many failed.

    Raises:
        DataError: no scan in ``input_dir``, an output would replace a file unet3plus did not
            write, or (without ``allow_failures``) some scans failed.
        UserError: the model cannot be loaded.
    """
    import pathlib

    from unet3plus.errors import DataError
    from unet3plus.predict import predict_folder, scans_in
    from unet3plus.utils import check_outputs

    config = start(params)
    if not pathlib.Path(input_dir).is_dir():
        raise DataError(f"{input_dir}: input_dir is not a folder; give a folder of .nii / .nii.gz scans on the volume")
    check_outputs({"output_dir": output_dir}, {"input_dir": input_dir})
    failures = predict_folder(model_uri, input_dir, output_dir, config)
    segmented = len(scans_in(input_dir)) - len(failures)
    if failures and not allow_failures:
        raise DataError(f"{input_dir}: {len(failures)} scan(s) failed, the others were segmented into {output_dir}: "
                        + "; ".join(failures.values()))
    return segmented, len(failures)
