"""Component: the raw CT dataset, synthesised (the default) or copied from a mounted folder."""

from kfp import dsl

from components.common import component, layout_of, start


@component
def raw_data(raw: dsl.Output[dsl.Dataset], dataset: str, params: str, source_dir: str = "") -> int:
    """Write the raw dataset of ``dataset`` in its native layout (LiTS for liver, MSD Task09 for spleen).

    Without ``source_dir`` a seeded synthetic phantom is written (``data.synth_*`` knobs). With it,
    an existing dataset in that folder (e.g. real LiTS data on a mounted PersistentVolumeClaim) is
    checked for the expected layout and copied into the artifact.

    Args:
        raw: output directory; metadata gets ``dataset``, ``layout``, ``cases`` and ``source``.
        dataset: ``"liver"`` or ``"spleen"``.
        params: text of ``params.yaml``.
        source_dir: folder holding an existing raw dataset, or ``""`` to synthesise one.

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
    out = Path(raw.path)
    if source_dir:
        source = Path(source_dir)
        if not source.is_dir():
            raise DataError(f"{source}: source_dir not found; mount the volume holding the raw {layout} dataset "
                            "there, or leave source_dir empty to synthesise one")
        cases = len(discover_cases(layout, source))
        with staged_dir(out) as staging:
            shutil.copytree(source, staging, dirs_exist_ok=True)
    else:
        cases = len(write_dataset(layout, out, cases=data.synth_cases, seed=data.synth_seed,
                                  size=data.synth_size, slices=data.synth_slices))
    raw.metadata.update({"dataset": dataset, "layout": layout, "cases": cases, "source": source_dir or "synthetic"})
    logging.getLogger("unet3plus").info("raw %s dataset: %d cases in %s", dataset, cases, out)
    return cases
