"""Component: the ``data`` section of the parameters alone, so that the data steps' cache keys see nothing else."""

from components.common import component, start


@component
def data_params(params: str) -> str:
    """The text of a ``params.yaml`` with only the (checked) ``data`` section of ``params``.

    KFP's cache key of a step is made of its inputs. The raw-data, validation and preprocessing
    steps read only ``data``, so they take this text instead of the whole ``params``: a run that
    changes a training knob finds them in the cache, and a change of ``data`` runs them again.

    Args:
        params: text of ``params.yaml``.

    Raises:
        ConfigError: invalid parameters.
    """
    import dataclasses
    import json

    import yaml

    data = dataclasses.asdict(start(params).data)
    return yaml.safe_dump({"data": json.loads(json.dumps(data))}, sort_keys=False)  # tuples -> lists
