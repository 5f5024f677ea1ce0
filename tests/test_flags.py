"""Tests for minicompress.flags: CLI flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minicompress import cli, config
from minicompress.config import DataConfig, ModelConfig, RecoverConfig, choice
from minicompress.errors import ConfigError
from minicompress.flags import CFG_PREFIX, build_from_args, config_flags, field_docs, flags_to_overrides, plain, summary

#: Every option string of every subcommand at 9c46bb4, the last hand-written cli.py:
#: ``{command: {option: {"dest", "action" (when not a plain store), "const", "choices"}}}``.
BEFORE = json.loads((Path(__file__).parent / "fixtures" / "cli_flags_9c46bb4.json").read_text())
ACTIONS = {argparse._StoreConstAction: "store_const", argparse._StoreTrueAction: "store_true",
           argparse._ExtendAction: "extend"}


def subparsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in sub._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings}


def described(action: argparse.Action) -> dict:
    entry = {"dest": action.dest}
    if type(action) in ACTIONS:
        entry = {"action": ACTIONS[type(action)], **entry}
    if isinstance(action, argparse._StoreConstAction) and type(action) is argparse._StoreConstAction:
        entry["const"] = action.const
    if action.choices:
        entry["choices"] = list(action.choices)
    return entry


def sample_value(action: argparse.Action) -> list[str]:
    if action.nargs == 0:
        return []
    return [str(action.choices[0])] if action.choices else ["1"]


# ---------------------------------------------------------------- every flag of before still works


@pytest.mark.parametrize("command", sorted(BEFORE))
def test_every_earlier_flag_keeps_its_key_action_and_choices(command):
    now = options(subparsers()[command])
    missing = sorted(set(BEFORE[command]) - set(now))
    assert not missing, f"{command}: flags gone: {missing}"
    for flag, before in BEFORE[command].items():
        assert described(now[flag]) == before, (command, flag)


@pytest.mark.parametrize("command", sorted(BEFORE))
def test_every_earlier_config_flag_parses_to_the_same_key(command):
    parser = cli.build_parser()
    positional = ["run.yaml"] if command == "run" else []
    for flag, before in BEFORE[command].items():
        if not before["dest"].startswith(CFG_PREFIX):
            continue
        action = options(subparsers(parser)[command])[flag]
        args, extra = parser.parse_known_args([command, *positional, flag, *sample_value(action)])
        assert not extra
        node = flags_to_overrides(args)
        for part in before["dest"][len(CFG_PREFIX):].split("."):
            node = node[part]
        assert node == before.get("const", sample_value(action)[0] if sample_value(action) else None), flag


def test_recover_teacher_dtype_and_device_reach_the_recipe(tmp_path):
    """``recover --teacher-dtype float32`` sets ``teacher_dtype``, the key the recipe loads and casts the
    teacher by (at 9c46bb4 the flag set ``teacher.dtype``, which the recipe replaced: it did nothing;
    the fixture records that one change)."""
    parser = cli.build_parser()
    args = parser.parse_args(["recover", "--student", "s", "--teacher", "t", "--data", "d", "--teacher-dtype",
                              "float32", "--teacher-device", "cpu", "--output", str(tmp_path / "o")])
    cfg = cli.build_from_args(config.RecoverConfig, args)
    assert cfg.teacher_dtype == "float32" and cfg.teacher_device == "cpu" and cfg.teacher.source == "t"


# ---------------------------------------------------------------- every knob has a flag, or a reason


def config_classes() -> list[type]:
    return [c for c in vars(config).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == config.__name__]


def test_every_config_field_is_documented():
    fields = [(cls.__name__, f.name) for cls in config_classes() for f in dataclasses.fields(cls)]
    assert len(fields) >= 169
    undocumented = [f"{c}.{n}" for c, n in fields if n not in field_docs(getattr(config, c))]
    assert not undocumented


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) and isinstance(inner[0], type):
            keys += leaf_keys(inner[0], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@pytest.mark.parametrize("name", [n for n, s in cli.SUBCOMMANDS.items() if s.config is not None])
def test_every_field_of_a_command_has_a_flag_or_is_excluded(name):
    sub = cli.SUBCOMMANDS[name]
    flagged = {f.key for f in config_flags(sub.config, exclude=sub.exclude, only=sub.only)}
    for key in leaf_keys(sub.config):
        top = key.split(".")[0]
        excluded = any(key == e or key.startswith(e + ".") for e in sub.exclude) or \
            (sub.only is not None and top not in sub.only)
        what = "a flag and an exclusion" if excluded else "neither a flag nor an exclusion"
        assert (key in flagged) != excluded, f"{name}: {key} has {what}"
    assert all(reason.strip() for reason in sub.exclude.values())


def test_recover_gets_its_settings_without_hand_written_flags():
    recover = options(subparsers()["recover"])
    for flag, key in (("--weight-decay", "weight_decay"), ("--grad-clip", "grad_clip"),
                      ("--eval-tokens", "eval_tokens"), ("--beta", "loss.beta"), ("--chunk-size", "loss.chunk_size"),
                      ("--no-shuffle", "data.shuffle")):
        assert recover[flag].dest == CFG_PREFIX + key
    assert "--values-dtype" in options(subparsers()["teacher-cache"])


# ---------------------------------------------------------------- a new setting: one file plus its test


@dataclass(frozen=True)
class NewRecoverConfig(RecoverConfig):
    """RecoverConfig with one more setting, as a contributor would add it to config.py.

    Attributes:
        label_smoothing: smoothing of the cross-entropy targets (0: none). Only the CE term.
        schedule: learning-rate schedule after warmup.
    """

    label_smoothing: float = 0.0
    schedule: str = choice("cosine", ("cosine", "linear"))

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")


def test_a_new_recover_setting_is_a_flag_with_its_docstring(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "recover", dataclasses.replace(cli.SUBCOMMANDS["recover"],
                                                                        config=NewRecoverConfig))
    parser = cli.build_parser()
    recover = subparsers(parser)["recover"]
    assert options(recover)["--schedule"].choices == ("cosine", "linear")
    text = recover.format_help()
    assert "smoothing of the cross-entropy targets (0: none). Only the CE term (default: 0)" in " ".join(text.split())
    common = ["recover", "--student", "s", "--teacher", "t", "--data", "d.txt", "--output", "out"]
    args, _ = parser.parse_known_args([*common, "--label-smoothing", "0.1", "--schedule", "linear"])
    cfg = build_from_args(NewRecoverConfig, args)
    assert (cfg.label_smoothing, cfg.schedule, cfg.teacher.source) == (0.1, "linear", "t")
    args, _ = parser.parse_known_args([*common, "--label-smoothing", "2"])
    with pytest.raises(ConfigError, match=r"^--label-smoothing \(label_smoothing\): must be in \[0, 1\), got 2.0$"):
        build_from_args(NewRecoverConfig, args)
    assert cli.main(["recover", "--schedule", "step"]) == 2  # argparse's choices, one line
    assert "argument --schedule: invalid choice: 'step'" in capsys.readouterr().err


# ---------------------------------------------------------------- the generator's rules


def test_names_sections_booleans_and_defaults():
    eval_flags = {f.key: f for f in config_flags(config.EvalConfig)}
    assert eval_flags["model.source"].names == ("--model",) and eval_flags["data.source"].names == ("--data",)
    assert eval_flags["teacher.source"].names == ("--teacher",)
    assert eval_flags["teacher.dtype"].names == ("--teacher-dtype",) and eval_flags["model.dtype"].names == ("--dtype",)
    assert eval_flags["data.seq_len"].names == ("--seq-len",) and eval_flags["output"].names == ("--output", "-o")
    assert eval_flags["speed"].names == ("--no-speed",) and eval_flags["speed"].kwargs["const"] is False
    assert eval_flags["data.shuffle"].names == ("--shuffle",)  # eval reads in file order: the switch turns it on
    assert eval_flags["overwrite"].kwargs["const"] is True
    assert eval_flags["model.dtype"].kwargs["choices"] == config.DTYPES
    assert "(default: file)" in eval_flags["data.documents"].kwargs["help"]
    assert "smollm2-135m (default" not in eval_flags["teacher.source"].kwargs["help"]  # no teacher by default
    prune = {f.key: f for f in config_flags(config.PruneConfig, exclude=cli.SUBCOMMANDS["prune"].exclude)}
    assert prune["score.num_samples"].names == ("--num-samples",)
    assert "(default: 256)" in prune["score.num_samples"].kwargs["help"]
    score = {f.key: f for f in config_flags(config.ScoreConfig)}
    assert "(default: 1024)" in score["num_samples"].kwargs["help"]
    assert score["autocast"].names == ("--score-autocast",)


@dataclass(frozen=True)
class Clash:
    """Two seeds.

    Attributes:
        data: the text.
        seed: the run's seed.
        extra: a mapping.
    """

    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Undocumented:
    """No attributes section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    depth: int = 1


def test_clashes_undocumented_fields_and_unknown_exclusions_are_refused():
    with pytest.raises(TypeError, match=r"--seed: the flag of both data.seed and seed"):
        config_flags(Clash, exclude=("extra",))
    with pytest.raises(TypeError, match=r"extra: a .*dict.* has no flag form"):
        config_flags(Clash, exclude=("seed",))
    assert [f.key for f in config_flags(Clash, exclude=("seed", "extra"))][-1] == "data.token_store"
    with pytest.raises(TypeError, match="no fields: sede"):
        config_flags(Clash, exclude=("seed", "extra", "sede"))
    with pytest.raises(TypeError, match=r"Undocumented.depth: no entry"):
        config_flags(Undocumented)


def test_docstring_entries_and_help_text():
    docs = field_docs(RecoverConfig)
    assert docs["tokens"] == "training budget in tokens."
    assert docs["warmup_steps"].startswith("linear warmup steps (None, the default: a tenth of the steps")
    assert plain("see :class:`~minicompress.config.RecoverConfig` and ``lr``, :mod:`minicompress.flags`") == \
        "see RecoverConfig and lr, minicompress.flags"
    text = "First sentence, e.g. this one. " + "Second sentence is long. " * 20
    assert summary(text) .startswith("First sentence, e.g. this one. Second sentence is long.")
    assert len(summary(text)) <= 220 and summary("One. Two.") == "One. Two."
    assert field_docs(config.LossConfig)["ce_weight"].startswith("weight of cross-entropy on the labels. The default")
