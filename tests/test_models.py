"""Tests for minicompress.models: every source kind loads into a plain float model."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL_TYPES, make_tiny_tokenizer
from minicompress.arch import count_parameters, get_adapter
from minicompress.config import ModelConfig
from minicompress.errors import MinicompressError
from minicompress.models import (BUILTIN_MODELS, load_model, resolve_device, resolve_source, size_on_disk,
    strip_quantization_config)


def unique_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folder_loads_in_dtype(tiny_model_dir, model_type, dtype):
    folder = tiny_model_dir(model_type)
    model, tokenizer = load_model(ModelConfig(source=str(folder), dtype=dtype))
    assert model.config.model_type == model_type
    assert get_adapter(model).model_type == model_type
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert count_parameters(model.config)["total"] == unique_parameter_count(model)
    assert tokenizer.eos_token_id == 3 and tokenizer.pad_token_id is not None
    assert not hasattr(model.config, "quantization_config")


def test_bare_string_and_for_training(tiny_model_dir):
    folder = tiny_model_dir("llama")
    model, _ = load_model(str(folder), for_training=True)
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_saved_folder_round_trips_weights(tiny_model_dir, make_tiny_model):
    folder = tiny_model_dir("qwen3", seed=5)
    model, _ = load_model(str(folder))
    reference = make_tiny_model("qwen3", seed=5)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_size_on_disk(tiny_model_dir):
    folder = tiny_model_dir("llama")
    expected = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size_on_disk(str(folder)) == expected > 0
    assert size_on_disk("some-org/some-model") is None


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_path_names_the_flag(tmp_path):
    with pytest.raises(MinicompressError) as err:
        load_model(str(tmp_path / "nope"))
    assert _one_line(err).startswith("--model: no such file or folder")
    with pytest.raises(MinicompressError) as err:
        load_model(str(tmp_path / "nope.gguf"))
    assert _one_line(err).startswith("--model: GGUF file not found")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinicompressError) as err:
        load_model(str(tmp_path / "empty"))
    assert "no config.json" in _one_line(err)


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(MinicompressError) as err:
        load_model(str(folder))
    message = _one_line(err)
    assert "'gpt2' is not supported" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"))


def test_hub_id_offline_gives_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import: set the constant too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MinicompressError) as err:
        load_model("minicompress-no-such-org/no-such-model")
    assert _one_line(err).startswith("--model 'minicompress-no-such-org/no-such-model':")


def test_resolve_source_kinds(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("llama")
    assert resolve_source(str(folder)) == (str(folder), {})
    assert resolve_source("org/name") == ("org/name", {"hub": True})
    with pytest.raises(MinicompressError, match="^--model: no such file"):
        resolve_source("./missing/folder")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(MinicompressError, match="^--device cuda"):
            resolve_device("cuda")


def test_builtins_are_registered():
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "gemma3-270m"}


def test_strip_quantization_config_on_a_fake_gguf_model(make_tiny_model, tmp_path):
    model = make_tiny_model("llama")
    model.config.quantization_config = types.SimpleNamespace(quant_method="gguf")
    model.hf_quantizer = object()
    strip_quantization_config(model)
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def write_tiny_gguf(path: Path, vocab: int = 64, hidden: int = 16, ffn: int = 32, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2) -> Path:
    """A tiny random llama GGUF file (F32 tensors, a sentencepiece-style vocab in metadata)."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers), w.add_context_length(128), w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn), w.add_head_count(heads), w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(97 + i % 26) * (1 + i // 26) for i in range(vocab - 3)]
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    ones = np.ones(hidden, np.float32)
    w.add_tensor("token_embd.weight", rand(vocab, hidden)), w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(vocab, hidden))
    hd = hidden // heads
    for i in range(layers):
        for name, shape in [("attn_q", (heads * hd, hidden)), ("attn_k", (kv_heads * hd, hidden)),
                            ("attn_v", (kv_heads * hd, hidden)), ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones), w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_gguf_loads_without_quantization_config_and_saves(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model(str(path))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert not hasattr(model.config, "quantization_config")
    assert count_parameters(model.config)["total"] == unique_parameter_count(model)
    assert tokenizer.eos_token_id == 2
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    again, _ = load_model(str(tmp_path / "hf"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert size_on_disk(str(path)) == path.stat().st_size


def test_gguf_conversion_progress_is_log_lines_off_a_terminal(tmp_path, monkeypatch, capfd, caplog):
    """transformers' own tqdm bar over the GGUF tensors wrote a \\r-redrawn line per tensor into
    a log file: off a terminal the conversion logs minicompress's plain progress lines instead."""
    import logging

    from transformers.utils import logging as hf_logging

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("MINICOMPRESS_PROGRESS", "1")
    monkeypatch.setenv("MINICOMPRESS_PROGRESS_INTERVAL", "3600")  # only the final line
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # as the CLI does: transformers' "Loading weights" bar is not this
    try:
        with caplog.at_level(logging.INFO, logger="minicompress.progress"):
            model, _ = load_model(str(path))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    err = capfd.readouterr().err
    assert "\r" not in err and "GGUF tensors" not in err, err[-500:]
    lines = [r.getMessage() for r in caplog.records if r.name == "minicompress.progress"]
    n = 3 + 9 * 2  # token_embd, output_norm, output + 9 tensors per layer
    assert lines == [lines[0]] and lines[0].startswith(f"dequantise tiny.gguf {n}/{n} tensors (100.0%)")
    assert model.config.num_hidden_layers == 2
    from transformers import modeling_gguf_pytorch_utils

    assert modeling_gguf_pytorch_utils.tqdm.__module__.startswith("tqdm")  # put back


@pytest.mark.slow
def test_real_smollm2_gguf_loads_and_saves(tmp_path, monkeypatch):
    from minicompress.models import _smollm2_gguf

    try:
        gguf_path = _smollm2_gguf()
    except MinicompressError as err:
        pytest.skip(str(err))
    model, tokenizer = load_model(str(gguf_path))
    assert not hasattr(model.config, "quantization_config")
    assert count_parameters(model.config)["total"] == unique_parameter_count(model) == 134_515_008
    model.save_pretrained(tmp_path / "smollm2")
    tokenizer.save_pretrained(tmp_path / "smollm2")
    assert (tmp_path / "smollm2" / "config.json").is_file()


def test_hub_id_in_the_local_cache_is_a_local_folder(tmp_path, monkeypatch, make_tiny_model):
    """A Hub id already downloaded resolves to its snapshot folder (for streaming prune and
    rank-0 loading), without the network; one that is not cached has none."""
    import huggingface_hub.constants

    from minicompress.models import local_folder
    from minicompress.pruning.streaming import streaming_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    make_tiny_model("llama").save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert local_folder("acme/tiny-llama") == snapshot
    assert streaming_source("acme/tiny-llama") == snapshot
    assert local_folder("acme/not-downloaded") is None
    with pytest.raises(MinicompressError, match="already in the local cache"):
        streaming_source("acme/not-downloaded")
    assert local_folder(str(snapshot)) == snapshot
