"""Exceptions that carry a message meant for the person running the tool.

The CLI prints ``str(error)`` of any :class:`UserError` as a one-paragraph message and exits
non-zero; anything else is a bug and gets a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: bad input, bad configuration, missing file."""


class ConfigError(UserError, ValueError):
    """``params.yaml`` or an override is invalid (unknown key, wrong type, bad value)."""


class DataError(UserError, ValueError):
    """A raw or preprocessed data file is missing, unreadable or inconsistent."""


class CheckpointError(UserError):
    """A model checkpoint is missing, truncated or not a unet3plus checkpoint."""


class TrainingError(UserError):
    """Training cannot go on: the loss or the weights became NaN or infinite."""

