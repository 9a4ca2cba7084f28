"""Component: the names of the ablations a run trains, read from its parameters for the pipeline's ParallelFor."""

from typing import List

from components.common import component, start


@component
def ablation_names(params: str) -> List[str]:
    """The names in ``ablations.run`` of ``params``, in order (checked: each names a valid variant).

    The pipeline iterates over them, and each train and evaluate step applies its variant by name,
    so the ablations exist in one place only: the parameters.

    Args:
        params: text of ``params.yaml``.

    Raises:
        ConfigError: invalid parameters (a variant that is not valid, a name that is not a variant).
    """

    return list(start(params).ablations.run)
