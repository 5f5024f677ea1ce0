"""Tests for minicompress.config: defaults, YAML, overrides and one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from minicompress.config import (DataConfig, EvalConfig, ModelConfig, PruneConfig, RecoverConfig, build_config,
    parse_overrides, to_dict)
from minicompress.errors import ConfigError, MinicompressError


def test_eval_defaults_keep_wikitext_protocol_when_data_source_is_overridden():
    cfg = build_config(EvalConfig, overrides={"data": {"source": "x.txt"}})
    assert cfg.data.source == "x.txt"
    assert cfg.data.documents == "file" and cfg.data.shuffle is False
    assert cfg.model.source == "smollm2-135m" and cfg.model.dtype == "float32"
    assert cfg.teacher is None and cfg.stride is None


def test_configs_are_frozen():
    cfg = build_config(EvalConfig, overrides=["data.source=x.txt"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 3  # type: ignore[misc]


def test_yaml_then_overrides_priority(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: a.txt\n  seq_len: 128\nbatch_size: 2\nmodel: some/folder\n")
    cfg = build_config(EvalConfig, path, ["data.seq_len=64", "teacher=t/folder"])
    assert cfg.data.source == "a.txt" and cfg.data.seq_len == 64 and cfg.batch_size == 2
    assert cfg.model == ModelConfig(source="some/folder")  # a bare string becomes {source: ...}
    assert cfg.teacher.source == "t/folder"


def test_coercion_of_strings():
    cfg = build_config(EvalConfig, overrides=["data.source=x", "data.max_tokens=16k", "speed=false", "stride=none",
                                              "model.trust_remote_code=yes"])
    assert cfg.data.max_tokens == 16000 and cfg.speed is False and cfg.stride is None
    assert cfg.model.trust_remote_code is True
    prune = build_config(PruneConfig, overrides=["target.drop_layers=[1, 3]", "target.target_params=0.5"])
    assert prune.target.drop_layers == (1, 3) and prune.target.target_params == 0.5


def test_parse_overrides_nests_and_rejects_malformed():
    assert parse_overrides(["a.b=1", "a.c=x=y", "d=2"]) == {"a": {"b": "1", "c": "x=y"}, "d": "2"}
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="both a value and a section"):
        parse_overrides(["a=1", "a.b=2"])


@pytest.mark.parametrize("overrides, culprit", [
    (["data.source=x", "model.dtype=float8"], "model.dtype"),
    (["data.source=x", "model.device=tpu"], "model.device"),
    (["data.source=x", "data.seq_len=abc"], "data.seq_len"),
    (["data.source=x", "data.seq_len=1"], "data.seq_len"),
    (["data.source=x", "autocast=fp16"], "autocast"),
    (["data.source=x", "data.seq_len=64", "stride=65"], "stride"),
    (["data.source=x", "batch_size=0"], "batch_size"),
    (["data.source=x", "bogus=1"], "bogus"),
    (["data.source=x", "data.bogus=1"], "data.bogus"),
    ([], "data.source"),
])
def test_bad_values_raise_one_line_config_error_naming_the_key(overrides, culprit):
    with pytest.raises(ConfigError) as info:
        build_config(EvalConfig, overrides=overrides)
    message = str(info.value)
    assert message.startswith(culprit + ":"), message
    assert "\n" not in message
    assert isinstance(info.value, MinicompressError)


def test_bad_dtype_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"^model\.dtype: 'int4' is not allowed; choose one of float32, bfloat16"):
        build_config(EvalConfig, overrides={"data": {"source": "x"}, "model": {"dtype": "int4"}})


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match="unknown key; allowed keys of data: source, text_field"):
        build_config(EvalConfig, overrides=["data.source=x", "data.seqlen=4"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="^--config: file not found"):
        build_config(EvalConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="^--config: .* is not valid YAML"):
        build_config(EvalConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(EvalConfig, listy)


def test_recover_config_cross_checks():
    with pytest.raises(ConfigError, match="^teacher:"):
        build_config(RecoverConfig)
    with pytest.raises(ConfigError, match="^global_batch_tokens:"):
        build_config(RecoverConfig, overrides=["teacher=t", "global_batch_tokens=1000"])


@pytest.mark.parametrize("overrides, culprit", [
    (["on_policy=-0.1"], "on_policy: must be in [0, 1]"),
    (["on_policy=1.5"], "on_policy: must be in [0, 1]"),
    (["on_policy=nan"], "on_policy: must be in [0, 1]"),
    (["on_policy=0.5", "on_policy_prompt_tokens=512"], "on_policy_prompt_tokens: must be below data.seq_len (512)"),
    (["on_policy=0.5", "on_policy_prompt_tokens=0"], "on_policy_prompt_tokens: must be a number > 0"),
    (["on_policy=0.5", "on_policy_temperature=0"], "on_policy_temperature: must be a number > 0"),
    (["on_policy=0.5", "on_policy_top_p=1.5"], "on_policy_top_p: must be in (0, 1]"),
    (["on_policy=0.5", "on_policy_top_k=-1"], "on_policy_top_k: must be a number >= 0"),
    (["on_policy_prompts=p.txt"], "on_policy_prompts: prompts the student's own samples; give on_policy > 0"),
    (["on_policy=0.5", "teacher=null", "teacher_cache=c", "loss.kind=sampled_kl"], "on_policy: the teacher must "
                                                                                   "score the student's own samples"),
    (["on_policy=0.5", "loss.kl_weight=0", "loss.ce_weight=1"], "on_policy: the student's samples are scored by "
                                                                "the teacher's divergence"),
])
def test_on_policy_settings_are_checked_in_one_line(overrides, culprit):
    with pytest.raises(ConfigError) as info:
        build_config(RecoverConfig, overrides=["teacher=t", *overrides])
    assert str(info.value).startswith(culprit) and "\n" not in str(info.value), str(info.value)


def test_on_policy_defaults_are_off_and_a_valid_setting_builds():
    off = build_config(RecoverConfig, overrides=["teacher=t"])
    assert (off.on_policy, off.on_policy_prompt_tokens, off.on_policy_prompts) == (0.0, 64, None)
    assert (off.on_policy_temperature, off.on_policy_top_k, off.on_policy_top_p) == (1.0, 0, 1.0)
    on = build_config(RecoverConfig, overrides=["teacher=t", "on_policy=1", "on_policy_prompts=p.jsonl",
                                                "loss.kind=reverse_kl"])
    assert on.on_policy == 1.0 and on.on_policy_prompts == "p.jsonl"


def test_to_dict_round_trips():
    cfg = build_config(EvalConfig, overrides=["data.source=x", "teacher=t", "stride=16", "data.seq_len=32"])
    again = build_config(EvalConfig, overrides=to_dict(cfg))
    assert again == cfg
    assert to_dict(DataConfig())["seq_len"] == 1024


def test_the_same_source_twice_in_a_mixture_is_refused(tmp_path, monkeypatch, capsys, offline_hub):
    """``--data-mix a.txt=0.5,a.txt=0.5`` trained without a word: one line names the flag and the
    source, before anything is written; a path spelled two ways is the same source."""
    from minicompress.cli import main

    text = tmp_path / "a.txt"
    text.write_text("hello world\n")
    monkeypatch.chdir(tmp_path)
    for mix in ("a.txt=0.5,a.txt=0.5", f"a.txt=0.5,{tmp_path}/../{tmp_path.name}/a.txt=0.5", "b=1,org/set=1,b=2"):
        assert main(["recover", "--student", "s", "--teacher", "t", "--data-mix", mix, "--output",
                     str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --data-mix (data.mixture): "), err
        assert "is given twice (sources " in err and "give each source once" in err
    with pytest.raises(ConfigError, match=r"^data.mixture: \./a.txt is given twice \(sources 1 and 2\)"):
        build_config(RecoverConfig, overrides={"teacher": "t", "data": [{"source": "a.txt", "weight": 1},
                                                                       {"source": "./a.txt", "weight": 2}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert len(build_config(DataConfig, overrides={"mixture": ["a.txt=1", "b.txt=1"]}).mixture) == 2  # distinct


def test_several_teachers_round_trip_yaml_json_and_the_repeated_flag(tmp_path):
    """``teachers`` and ``teacher_weights`` (and a source's ``teacher``) survive YAML, the saved resolved config
    and ``--teacher A --teacher B``; one teacher stays what it was."""
    import json

    import yaml

    from minicompress import cli
    from minicompress.config import SourceConfig, TeacherConfig

    path = tmp_path / "r.yaml"
    path.write_text("teacher: A\nteachers:\n  - B\n  - {source: C, trust_remote_code: true}\n"
                    "teacher_weights: [0.5, 0.3, 0.2]\n"
                    "data:\n  - {source: x.txt, weight: 2, teacher: C}\n  - {source: y.txt}\n"
                    "  - {source: z.txt, teacher: 1}\n")
    cfg = build_config(RecoverConfig, path)
    assert cfg.teachers == (TeacherConfig(source="B"), TeacherConfig(source="C", trust_remote_code=True))
    assert cfg.teacher_names() == ["A", "B", "C"] and cfg.teacher_caches() == (None, None, None)
    assert cfg.mixture_weights() == pytest.approx((0.5, 0.3, 0.2)) and cfg.source_teachers() == (2, None, 1)
    assert cfg.data.mixture[0] == SourceConfig("x.txt", 2.0, "C")
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg)))))  # as minicompress.json saves it
    assert build_config(RecoverConfig, again) == cfg == build_config(RecoverConfig, overrides=to_dict(cfg))
    cached = build_config(RecoverConfig, overrides={"teacher_cache": "K", "teachers": ["B", {"cache": "C"}]})
    assert cached.teacher_names() == ["K", "B", "C"] and cached.teacher_caches() == ("K", None, "C")
    assert build_config(RecoverConfig, overrides=to_dict(cached)) == cached
    one = build_config(RecoverConfig, overrides=["teacher=A"])
    assert one.teachers == () and one.teacher_weights == () and one.mixture_weights() == (1.0,)
    parser = cli.build_parser()
    args = parser.parse_args(["recover", "--teacher", "A", "--teacher", "B", "--teacher", "C", "--teacher-weights",
                              "0.7,0.2,0.1", "--data", "d", "-o", str(tmp_path / "o")])
    cfg = cli.build_from_args(RecoverConfig, args)
    assert cfg.teacher.source == "A" and [t.source for t in cfg.teachers] == ["B", "C"]
    assert cfg.teacher_weights == (0.7, 0.2, 0.1)
    cfg = cli.build_from_args(RecoverConfig, parser.parse_args(["recover", "--teacher", "A", "--data", "d"]))
    assert cfg.teachers == ()


@pytest.mark.parametrize("overrides, message", [
    ({"teachers": ["B"], "loss": {"kl_weight": 0, "ce_weight": 1}}, "teachers: more teachers need a first one"),
    ({"teacher": "A", "teachers": [{"source": "B", "cache": "C"}]}, "teachers[0].source: give the teacher's model"),
    ({"teacher": "A", "teachers": [{}]}, "teachers[0].source: give the teacher's model"),
    ({"teacher": "A", "teacher_weights": [1, 2]}, "teacher_weights: 2 weights for 1 teacher;"),
    ({"teacher": "A", "teachers": ["B"], "teacher_weights": "1,nan"}, "teacher_weights: must be numbers > 0"),
    ({"teacher": "A", "teachers": ["B"], "loss": {"intermediate_weight": 1}}, "loss.intermediate_weight: "),
    ({"teacher": "A", "teachers": [{"cache": "C"}], "loss": {"kind": "jsd"}}, "loss.kind: jsd needs full teacher"),
    ({"teacher_cache": "C", "teachers": ["B"], "loss": {"kind": "sampled_kl"}}, "loss.kind: sampled_kl estimates"),
    ({"teacher": "A", "teachers": [{"cache": "C"}], "data": [{"source": "x"}, {"source": "y"}]},
     "data.mixture: a teacher cache trains on the cache's own rows"),
    ({"teacher": "A", "teachers": ["B"], "data": [{"source": "x", "teacher": "Q"}, {"source": "y"}]},
     "data.mixture[0].teacher: 'Q' names no teacher; give an index 0-1 or one of A, B"),
    ({"teacher": "A", "data": [{"source": "x"}, {"source": "y", "teacher": 3}]},
     "data.mixture[1].teacher: teacher 3 does not exist; the teachers are 0-0"),
    ({"teacher": "A", "data": [{"source": "x", "teacher": " "}, {"source": "y"}]},
     "data.mixture[0].teacher: must name a teacher"),
])
def test_bad_teachers_raise_one_line_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_config(RecoverConfig, overrides=overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_the_search_distils_from_the_original_alone():
    for key, value in (("teachers", ["B"]), ("teacher_weights", [1.0])):
        with pytest.raises(ConfigError, match=f"^search_recover.{key}: the search distils every candidate from"):
            build_config(PruneConfig, overrides={"search_recover": {key: value}}).search_recover_config()


def test_an_override_addresses_one_item_of_a_list(tmp_path):
    from minicompress.config import RunConfig
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": "m"}, "data": {"source": "c.txt"}, "output": "out",
        "stages": [{"name": "a", "target": {"num_hidden_layers": 4}, "tokens": 4096},
                   {"name": "b", "target": {"num_hidden_layers": 2}, "tokens": 8192}]}))
    cfg = build_config(RunConfig, path, ["stages.1.tokens=16384", "stages.0.target.intermediate_size=32"])
    a, b = cfg.stages
    assert (a.name, a.tokens, b.name, b.tokens) == ("a", 4096, "b", 16384)
    assert (a.target.num_hidden_layers, a.target.intermediate_size, b.target.num_hidden_layers) == (4, 32, 2)
    with pytest.raises(ConfigError, match=r"^stages\.2: no such item; stages has 2 \(indices 0 to 1\)$"):
        build_config(RunConfig, path, ["stages.2.tokens=1"])
    with pytest.raises(ConfigError, match=r"^stages\.tokens: stages is a list; address one item by its index "
                                          r"\(stages\.0\.tokens=\.\.\.\)$"):
        build_config(RunConfig, path, ["stages.tokens=1"])
