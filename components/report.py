"""Component: the ablation study's tables, read back from MLflow, as a Markdown artifact of the run."""

from kfp import dsl

from components.common import component, start


@component
def report_ablations(report: dsl.Output[dsl.Markdown], params: str, dataset: str) -> None:
    """Write the paper-style Tables 1 and 2 of this run's study (``unet3plus report``) for the KFP UI.

    The pipeline runs it with ``ignore_upstream_failure``: after a failed ablation it still
    reports the others and marks the failure (its FAILED MLflow run carries the error).

    Args:
        report: the markdown (shown in the run's Visualizations tab).
        params: text of ``params.yaml`` (``mlflow`` is used, and ``ablations.run``: only these
            variants and the main model are reported).
        dataset: the organ of this run; other organs' runs are left out.

    Raises:
        UserError: MLflow has no training run of this study.
    """
    from unet3plus.report import collect_runs, configuration_table, report_markdown

    config = start(params)  # its ablations.run: this run's variants, each gets a row
    collected = collect_runs(config, [dataset])
    with open(report.path, "w") as handle:
        handle.write(report_markdown(configuration_table(collected), collected.studies))
