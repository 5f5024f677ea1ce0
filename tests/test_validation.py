"""Early refusals: impossible prune targets before any weights or data load, damaged weights,
and transformers' own output kept out of the way unless ``-v``."""

from __future__ import annotations

import pytest

from minicompress.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model's weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the target was checked")

    monkeypatch.setattr("minicompress.recipes.prune.load_model", refuse)
    monkeypatch.setattr("minicompress.recipes.score.load_model", refuse)


def _prune(model_dir, tmp_path, *flags) -> list[str]:
    # the data does not exist: a target error must come first
    return ["prune", "--model", str(model_dir), "--data", str(tmp_path / "no-data.txt"),
            "--output", str(tmp_path / "out"), *flags]


@pytest.mark.parametrize("flags, message", [
    (["--intermediate-size", "5000"],
     "error: --intermediate-size (target.intermediate_size): must be between 1 and the model's 64, got 5000"),
    (["--target-params", "1.5"], "error: --target-params (target.target_params): 1.5 is neither a ratio in (0, 1] "
                                 "nor a whole parameter count"),
    (["--target-params", "100M"], "error: --target-params (target.target_params): 100,000,000 is not below the "
                                  "model's"),
    (["--target-params", "0.5", "--hidden-size", "16"], "error: --target-params (target.target_params): give either"),
    (["--num-hidden-layers", "7"], "error: --num-hidden-layers (target.num_hidden_layers): must be between 1 and 3"),
])
def test_impossible_targets_fail_before_loading(tmp_path, tiny_model_dir, capsys, no_loading, flags, message):
    model_dir = tiny_model_dir("llama", num_hidden_layers=3)
    capsys.readouterr()
    assert main(_prune(model_dir, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_query_heads_must_fill_kv_groups(tmp_path, tiny_model_dir, capsys, no_loading):
    model_dir = tiny_model_dir("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    capsys.readouterr()
    assert main(_prune(model_dir, tmp_path, "--num-attention-heads", "4")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num-attention-heads (target.num_attention_heads): 4 is not divisible by the "
                          "model's 3 KV heads"), err


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, tiny_model_dir, text_corpus, capsys):
    model_dir = tiny_model_dir("llama")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    capsys.readouterr()
    argv = ["eval", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16", "--no-speed"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights} is damaged or truncated" in err, err


def test_transformers_bars_only_with_verbose(tiny_model_dir, text_corpus, capfd):
    model_dir = tiny_model_dir("llama")
    capfd.readouterr()
    argv = ["eval", "--model", str(model_dir), "--data", str(text_corpus), "--seq-len", "16", "--no-speed"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "past_key_values" not in err
    assert main(argv + ["-v"]) == 0
    assert "Loading weights" in capfd.readouterr().err
    assert main(argv) == 0  # and off again
    assert "Loading weights" not in capfd.readouterr().err
