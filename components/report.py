"""Component: the ablation study's tables, read back from MLflow, as a Markdown artifact of the run."""


from kfp import dsl

from components.common import component, start


@component
def report_ablations(report: dsl.Output[dsl.Markdown], params: str, dataset: str,
                     kfp_run_id: str = "", kfp_run_name: str = "", pipeline_version: str = "") -> None:
    """Write the paper-style Tables 1 and 2 of this run's study (``unet3plus report``) for the KFP UI.

    The pipeline runs it with ``ignore_upstream_failure``: after a failed ablation it still
    reports the others and marks the failure (its FAILED MLflow run carries the error).

    Args:
        report: the markdown (shown in the run's Visualizations tab).
        params: text of ``params.yaml`` (``mlflow`` is used, and ``ablations.run``: only these
            variants and the main model are reported).
        dataset: the organ of this run; other organs' runs are left out.
        kfp_run_id, kfp_run_name, pipeline_version: the Kubeflow run's id and name (KFP's placeholders)
            and the pipeline version; every MLflow run this step writes is tagged with them
            (``components.common.start``). Only the training runs
            of this pipeline run are reported (tag ``kfp_run_id``), never a concurrent run's.

    Raises:
        UserError: MLflow has no training run of this study.
    """
    from unet3plus.report import collect_runs, configuration_table, report_markdown

    # Its ablations.run: this run's variants, each gets a row.
    config = start(params, kfp_run=[kfp_run_id, kfp_run_name, pipeline_version])
    collected = collect_runs(config, [dataset], kfp_run_id=kfp_run_id or None)
    with open(report.path, "w") as handle:
        handle.write(report_markdown(configuration_table(collected), collected.studies))
