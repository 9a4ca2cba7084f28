"""The `unet3plus` command: every verb documents itself and user errors exit 2 with one message."""

import argparse
import subprocess
import sys

import pytest

from unet3plus.cli import build_parser, main


def _verbs() -> dict:
    """The parser's own verbs (name -> subparser): a new verb is tested without editing this file."""
    parser = build_parser()
    (subparsers,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices


VERBS = sorted(_verbs())


def test_the_verbs_include_every_pipeline_step():
    assert {"synth", "validate", "preprocess", "train", "evaluate", "register", "predict", "report",
            "extract"} <= set(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_a_help_that_explains_it(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--params" in text and "--set" in text
    description = _verbs()[verb].description
    assert description and len(description) > 60


def test_console_script_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "unet3plus", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


def test_bad_override_exits_2_with_a_message_naming_the_key(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--set", "train.epochz=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.epochz" in err
    assert not (tmp_path / "out").exists()


def test_params_file_with_wrong_type_exits_2_naming_file_and_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: many\n")
    code = main(["train", "--params", str(params), "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(params) in err and "train.epochs" in err and "wrong type" in err
