"""Component: raw volumes -> 3-slice .npz samples plus manifest, with deterministic splits."""

from kfp import dsl

from components.common import component, content_key, dataset_output, input_dir, layout_of, start


@component
def preprocess_data(
    raw: dsl.Input[dsl.Dataset],
    processed: dsl.Output[dsl.Dataset],
    dataset: str,
    params: str,
    workspace: str = "",
) -> None:
    """Preprocess the raw dataset into training samples (``unet3plus preprocess``).

    With a ``workspace`` the samples are written on the claim, in a folder named after the raw
    dataset and the ``data`` settings, and the artifact is a reference to it; preprocessing again
    with unchanged input is a no-op there.

    Args:
        raw: the raw dataset directory (from ``raw_data``).
        processed: output directory (``manifest.csv``, ``cases.json``, ``samples/``); metadata
            gets the dataset, the sample size and the number of samples and cases per split.
        dataset: ``"liver"`` or ``"spleen"``.
        params: text of ``params.yaml`` (the ``data`` section is used).
        workspace: where the workspace claim is mounted, or ``""`` (the dataset is the artifact).

    Raises:
        ConfigError: unknown dataset or invalid parameters.
        DataError: the raw input is not a directory or fails validation (nothing is written).
    """
    from unet3plus.data.dataset import load_preprocessed
    from unet3plus.data.preprocess import preprocess_dataset

    layout = layout_of(dataset)
    config = start(params)
    raw_dir = input_dir(raw, "raw dataset", "raw_data")
    out = dataset_output(processed, workspace, "processed", content_key(str(raw_dir), vars(config.data)))
    preprocess_dataset(layout, raw_dir, out, config.data)
    manifest, _ = load_preprocessed(out)
    processed.metadata.update({"dataset": dataset, "size": config.data.size, "samples": len(manifest)})
    for split, rows in manifest.groupby("split"):
        processed.metadata[f"{split}_samples"] = len(rows)
        processed.metadata[f"{split}_cases"] = rows["case_id"].nunique()
