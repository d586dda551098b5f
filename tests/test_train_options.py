"""Tests of the training program's options: parsing, presets, what a resumed run keeps, usage errors.

The command line is run in-process (``train.__main__.main``); a subprocess only where the real
process's exit status and stderr are the subject.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from train_helpers import Config, run, run_cli, run_main, tiny_argv, tiny_config

from train.config import RUN_OPTIONS, TRAINING_OPTIONS, build_parser, parse_args, resume_config
from train.errors import ConfigError


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "-1"],
        ["--epochs", "2.5"],
        ["--lr", "fast"],
        ["--lr", "-0.1"],
        ["--activation", "swish"],
        ["--hidden", "512,x"],
        ["--hidden", "99999999999999999999"],
        ["--dropout", "1"],
        ["--batch-size", "0"],
        ["--preset", "fastest"],
        ["--seed", str(2**64)],
        ["--seed", "-1"],
        ["--threads", "100000"],
        ["--threads", "0"],
        ["--out", ""],
        ["--resume", ""],
        ["--data-dir", " "],
    ],
)
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and argv[0] in err


def test_every_config_field_is_one_option_with_one_role():
    """The parser and the option lists come from the Config fields: each field is an option of the parser,
    with the field's default, and is a training option, a run option, or one of the three that resume_config
    settles itself (preset, data_dir, out)."""
    fields = [f.name for f in dataclasses.fields(Config)]
    assert vars(build_parser(Config()).parse_args([])) == dataclasses.asdict(Config())
    assert not set(TRAINING_OPTIONS) & set(RUN_OPTIONS)
    assert sorted([*TRAINING_OPTIONS, *RUN_OPTIONS, "preset", "data_dir", "out"]) == sorted(fields)
    assert TRAINING_OPTIONS[:3] == ("model", "epochs", "batch_size") and "threads" in RUN_OPTIONS


def test_the_largest_seed_and_auto_threads_are_accepted():
    cfg, given = parse_args(["--seed", str(2**64 - 1), "--threads", "auto"])
    assert cfg.seed == 2**64 - 1 and cfg.threads is None and given == {"seed", "threads"}


def test_the_thread_cap_is_in_the_help():
    text = build_parser(Config()).format_help()
    assert "--threads" in text and "auto" in text and "(default: auto)" in text


def test_preset_values_are_defaults_that_flags_override():
    best, _ = parse_args(["--preset", "best"])
    assert best.augment != "none" and best.hidden != Config().hidden
    mine, given = parse_args(["--preset", "best", "--epochs", "3", "--hidden", "64"])
    assert (mine.epochs, mine.hidden, mine.augment) == (3, (64,), best.augment)
    assert given == {"preset", "epochs", "hidden"}


def test_given_options_are_found_without_private_argparse_api():
    cfg, given = parse_args(["--no-progress", "--lr", "0.002", "--out", "x"])
    assert given == {"progress", "lr", "out"}  # --lr given with its default value still counts as given
    assert cfg.progress is False and cfg.lr == 0.002
    only_given = vars(build_parser(None).parse_args(["--lr", "0.1"]))
    assert only_given == {"lr": 0.1}
    with pytest.raises(SystemExit):
        build_parser(None).parse_args(["--lr", "x"])


def test_resume_config_keeps_the_checkpoints_training_options():
    saved = Config(hidden=(32, 16), batch_size=16, lr=3e-3, data_dir="old/")
    cli, given = parse_args(["--resume", "somewhere", "--threads", "1"])  # where and how it runs may change
    cfg = resume_config(cli, saved, given)
    assert cfg.hidden == (32, 16) and cfg.batch_size == 16 and cfg.out is None and cfg.threads == 1
    assert cfg.data_dir == "old/" and cfg.resume == "somewhere"
    cli, given = parse_args(["--resume", "somewhere", "--lr", "0.5", "--epochs", "3"])
    with pytest.raises(ConfigError, match="--epochs, --lr differ"):
        resume_config(cli, saved, given)
    # from Python (given=None) every training option counts as chosen
    with pytest.raises(ConfigError, match="--hidden"):
        resume_config(Config(resume="somewhere"), saved)
    same = Config(**{k: getattr(saved, k) for k in TRAINING_OPTIONS}, resume="x", out="elsewhere")
    assert resume_config(same, saved).out == "elsewhere"


def test_resume_cli_refuses_changed_training_options(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_config(tiny, out))
    status, _, err = run_main(["--resume", str(out), "--lr", "0.5"], capsys)
    assert status == 2 and "--lr differ from its checkpoint" in err
    status, _, err = run_main(["--resume", str(out), "--compare-native"], capsys)
    assert status == 2 and "--compare-native cannot be combined with --resume" in err
    status, _, err = run_main(["--resume", str(tmp_path / "nowhere"), "--compare-native"], capsys)
    assert status == 2 and "--compare-native cannot be combined with --resume" in err  # before reading a file
    status, printed, _ = run_main(["--resume", str(out), "--threads", "1", "--no-progress"], capsys)
    assert status == 0 and "nothing to do" in printed


def test_threads_too_many_is_a_usage_error_not_a_crash(tiny, tmp_path, capsys):
    status, _, err = run_main(tiny_argv(tiny, tmp_path / "run", "--threads", "100000"), capsys)
    assert status == 2 and "--threads" in err and "4x this machine's" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_option_from_the_command_line(tmp_path):
    result = run_cli("--lr", "abc")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--lr" in result.stderr


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as argparse wraps it, joined again
    assert "(default: 15)" in text and "(default: 512,256)" in text
    with pytest.raises(SystemExit):
        parse_args(["--preset", "best-mlp", "--help"])
    assert "(default: 50)" in capsys.readouterr().out  # the preset's defaults
    with pytest.raises(SystemExit):
        parse_args(["--model", "cnn", "--help"])
    assert "(default: 6)" in capsys.readouterr().out  # the model's defaults


def test_types_reject_what_torch_would_crash_on():
    from train import config

    with pytest.raises(argparse.ArgumentTypeError):
        config.seed(str(2**64))
    with pytest.raises(argparse.ArgumentTypeError):
        config.threads(str(config.MAX_THREADS + 1))
    assert config.threads(str(config.MAX_THREADS)) == config.MAX_THREADS
