"""Component: check every raw case and report all problems at once."""

from kfp import dsl

from components.common import component, input_dir, layout_of, start


@component
def validate_data(
    raw: dsl.Input[dsl.Dataset],
    report: dsl.Output[dsl.Artifact],
    dataset: str,
    params: str,
) -> int:
    """Validate every case of the raw dataset; fail with the list of all problems found.

    Args:
        raw: the raw dataset directory (from ``raw_data``).
        report: JSON file with the findings (``cases``, ``errors``, ``warnings``), written even
            when validation fails, so the problems can be read from the artifact store.
        dataset: ``"liver"`` or ``"spleen"``.
        params: text of ``params.yaml`` (``data.workers`` is used).

    Returns:
        The number of valid cases.

    Raises:
        ConfigError: unknown dataset or invalid parameters.
        DataError: the raw input is not a directory, or any case has a problem (all listed, each
            naming its file).
    """
    import logging

    from unet3plus.data.validation import validate_dataset
    from unet3plus.errors import DataError
    from unet3plus.utils import write_json_atomic

    logger = logging.getLogger("unet3plus")
    layout = layout_of(dataset)
    workers = start(params).data.workers
    raw_dir = input_dir(raw, "raw dataset", "raw_data")
    findings = validate_dataset(layout, raw_dir, workers=workers)
    write_json_atomic(report.path, findings.to_dict())
    for warning in findings.warnings:
        logger.warning("%s", warning)
    if findings.errors:
        raise DataError(f"{raw_dir}: {len(findings.errors)} problem(s) found:\n  " + "\n  ".join(findings.errors))
    report.metadata.update({"cases": findings.cases, "warnings": len(findings.warnings)})
    logger.info("%s: %d cases valid (%d warnings)", raw_dir, findings.cases, len(findings.warnings))
    return findings.cases
