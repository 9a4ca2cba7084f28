"""unet3plus.errors: a problem the user can fix is a UserError, one `error:` line and exit 2; a bug keeps its traceback."""

import argparse

import pytest

from unet3plus import errors
from unet3plus.cli import run_parsed
from unet3plus.errors import ConfigError, DataError, UserError

# Every error class of the module, so a new one is tested without editing this file.
USER_ERRORS = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]


def _raising(error: BaseException) -> argparse.Namespace:
    """Parsed arguments of a verb that raises ``error``."""

    def verb(args: argparse.Namespace) -> None:
        raise error

    return argparse.Namespace(verbose=False, func=verb)


def test_every_error_of_the_module_is_a_user_error_and_bad_settings_or_data_are_value_errors():
    assert len(USER_ERRORS) >= 5 and all(issubclass(error, UserError) for error in USER_ERRORS)
    # for library callers that catch ValueError
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda error: error.__name__)
def test_every_user_error_is_one_error_line_and_exit_status_2(error, capsys):
    assert run_parsed(_raising(error("data/raw/volume-3.nii: truncated"))) == 2
    assert capsys.readouterr().err == "error: data/raw/volume-3.nii: truncated\n"


def test_any_other_exception_is_a_bug_and_propagates():
    with pytest.raises(RuntimeError, match="a bug"):
        run_parsed(_raising(RuntimeError("a bug")))
