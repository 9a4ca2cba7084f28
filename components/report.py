"""Component: the ablation study's tables, read back from MLflow, as a Markdown artifact of the run."""

from typing import List, Optional

from kfp import dsl

from components.common import component, load_config


@component
def report_ablations(report: dsl.Output[dsl.Markdown], params: str, dataset: str, ablations: Optional[List[dict]] = None) -> None:
    """Write the paper-style Tables 1 and 2 of this run's study (``unet3plus report``) for the KFP UI.

    The pipeline runs it with ``ignore_upstream_failure``: after a failed ablation it still
    reports the others and marks the failure (its FAILED MLflow run carries the error).

    Args:
        report: the markdown (shown in the run's Visualizations tab).
        params: text of ``params.yaml`` (``mlflow`` is used).
        dataset: the organ of this run; other organs' runs are left out.
        ablations: the run's ``{"name", "overrides"}`` entries; only these variants and the main model are
            reported.

    Raises:
        UserError: MLflow has no training run of this study.
    """
    from unet3plus.report import collect_runs, configuration_table, report_markdown
    from unet3plus.utils import setup_logging

    setup_logging()
    import dataclasses

    from unet3plus.config import AblationsConfig, parse_yaml

    # This run's variants (name, section.key=value overrides): the report gives each a row.
    grid = AblationsConfig(
        variants={entry["name"]: {key.strip(): parse_yaml(value) for key, _, value in
                                  (item.partition("=") for item in entry["overrides"])} for entry in ablations or []},
        run=[entry["name"] for entry in ablations or []])
    config = dataclasses.replace(load_config(params), ablations=grid).validate()
    collected = collect_runs(config, [dataset])
    with open(report.path, "w") as handle:
        handle.write(report_markdown(configuration_table(collected), collected.studies))
