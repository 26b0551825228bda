"""mlm/settings.py: flags typed by the dataclass fields' annotations, and the TOML layer."""

import argparse

import pytest

from mlm.errors import ConfigError
from mlm.settings import flag_kwargs, read_toml


def parse(hint, *values):
    p = argparse.ArgumentParser()
    p.add_argument("--x", default=None, **flag_kwargs(hint))
    return p.parse_args(["--x", *values] if values else []).x


def test_each_annotation_gives_its_flag_type():
    assert parse(int, "3") == 3 and parse(float, "3") == 3.0 and parse(str, "3") == "3"
    assert parse(int | None, "7") == 7  # X | None is an X
    assert (
        parse(int | str, "16") == 16
        and parse(int | str, "auto") == "auto"
        and parse(int | str, "-1") == -1
    )
    assert parse(list[str], "a", "b") == ["a", "b"]
    assert parse(tuple[float, float], "0.9", "0.98") == [0.9, 0.98]
    with pytest.raises(SystemExit):
        parse(tuple[float, float], "0.9")  # a tuple takes exactly its count
    p = argparse.ArgumentParser()
    p.add_argument("--flag", default=None, **flag_kwargs(bool))
    assert p.parse_args(["--flag"]).flag is True and p.parse_args(["--no-flag"]).flag is False


def test_toml_layer_splits_the_model_table_and_refuses_unknown_keys(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text("lr = 0.001\nmax_steps = 5\n[model]\nhidden_size = 64\n")
    assert read_toml(str(good), {"lr", "max_steps"}, "X") == (
        {"lr": 0.001, "max_steps": 5},
        {"hidden_size": 64},
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 0.001\nmax_stepz = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_stepz' in .*bad.toml; see X"):
        read_toml(str(bad), {"lr", "max_steps"}, "X")
    with pytest.raises(ConfigError, match="cannot read --config"):
        read_toml(str(tmp_path / "missing.toml"), set(), "X")


def test_every_train_flag_has_its_fields_comment_as_help(capsys):
    """train.py --help explains each of its ~90 flags with the comment beside the field."""
    import dataclasses

    from mlm.config import TrainConfig, parse_config
    from mlm.model import ModelConfig
    from mlm.settings import field_comments

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    comments = {**field_comments(ModelConfig), **field_comments(TrainConfig)}
    names = [f.name for c in (ModelConfig, TrainConfig) for f in dataclasses.fields(c) if f.init]
    for name in set(names) - {"model", "preset"}:
        assert name in comments, f"{name} has no comment to show as its help"
        assert "".join(comments[name].split()) in shown, name
