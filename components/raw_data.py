"""Component: the raw CT dataset, synthesised (the default) or copied from a mounted folder."""

from kfp import dsl

from components.common import component, content_key, dataset_output, layout_of, start


@component
def raw_data(raw: dsl.Output[dsl.Dataset], dataset: str, params: str, source_dir: str = "",
             workspace: str = "") -> int:
    """Write the raw dataset of ``dataset`` in its native layout (LiTS for liver, MSD Task09 for spleen).

    Without ``source_dir`` a seeded synthetic phantom is written (``data.synth_*`` knobs). With it,
    an existing dataset in that folder (e.g. real LiTS data on a mounted PersistentVolumeClaim) is
    checked for the expected layout and copied into the artifact.

    With a ``workspace`` (the mount path of the pipeline's workspace claim) the dataset stays on
    the claim and the artifact is a reference to it (``components.common.dataset_output``): a
    ``source_dir`` on the claim is referenced in place, one elsewhere is copied onto the claim once,
    and a phantom is written there once per set of ``data.synth_*`` settings.

    Args:
        raw: output directory; metadata gets ``dataset``, ``layout``, ``cases`` and ``source``.
        dataset: ``"liver"`` or ``"spleen"``.
        params: text of ``params.yaml``.
        source_dir: folder holding an existing raw dataset, or ``""`` to synthesise one.
        workspace: where the workspace claim is mounted, or ``""`` (the dataset is the artifact).

    Returns:
        The number of cases.

    Raises:
        ConfigError: unknown dataset or invalid parameters.
        DataError: ``source_dir`` is missing or holds no case of the expected layout.
    """
    import logging
    import shutil
    from pathlib import Path

    from unet3plus.data.phantom import write_dataset
    from unet3plus.data.sources import discover_cases
    from unet3plus.errors import DataError
    from unet3plus.utils import staged_dir

    layout = layout_of(dataset)
    data = start(params).data
    synth = {"cases": data.synth_cases, "seed": data.synth_seed, "size": data.synth_size, "slices": data.synth_slices}
    if source_dir:
        source = Path(source_dir)
        if not source.is_dir():
            raise DataError(f"{source}: source_dir not found; mount the volume holding the raw {layout} dataset "
                            "there, or leave source_dir empty to synthesise one")
        cases = len(discover_cases(layout, source))
        on_claim = bool(workspace) and source.resolve().is_relative_to(Path(workspace).resolve())
        out = dataset_output(raw, workspace, "raw", content_key(dataset, str(source)),
                             existing=str(source) if on_claim else "")
        if not on_claim and not (workspace and out.is_dir()):  # copied onto the claim once
            with staged_dir(out) as staging:
                shutil.copytree(source, staging, dirs_exist_ok=True)
    else:
        out = dataset_output(raw, workspace, "raw", content_key(dataset, synth))
        if not (workspace and out.is_dir()):  # on the claim: written once (atomically) per settings
            write_dataset(layout, out, **synth)
        cases = len(discover_cases(layout, out))
    raw.metadata.update({"dataset": dataset, "layout": layout, "cases": cases, "source": source_dir or "synthetic"})
    logging.getLogger("unet3plus").info("raw %s dataset: %d cases in %s", dataset, cases, out)
    return cases
