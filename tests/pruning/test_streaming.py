"""``prune --streaming``: tensor-by-tensor pruning equals the in-memory rewrite byte for byte."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_MODEL_TYPES, make_tiny_model, make_tiny_tokenizer
from minicompress import outputs
from minicompress.pruning import streaming
from minicompress.cli import main
from minicompress.config import ModelConfig
from minicompress.errors import MinicompressError
from minicompress.models import load_model
from minicompress.pruning.plan import apply_plan_, make_plan
from minicompress.pruning.scoring import score_model
from minicompress.recipes.prune import write_pruned_checkpoint

# changes hidden size, query heads, KV heads and FFN, and drops one of 3 layers
SHRINK = {"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_hidden_layers": 2}
IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path")


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(4, 256, shape, generator=torch.Generator().manual_seed(seed))


def _save(folder: Path, model_type: str, dtype=torch.float32, **save_kwargs) -> Path:
    model = make_tiny_model(model_type, num_hidden_layers=3).to(dtype)
    model.save_pretrained(folder, **save_kwargs)
    make_tiny_tokenizer(add_bos=model_type == "gemma3_text").save_pretrained(folder)
    return folder


def _plan(folder: Path, target=SHRINK):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    scores = score_model(model, [_ids(1), _ids(2)], loss_batches=[_ids(3)])
    return scores, make_plan(scores, AutoConfig.from_pretrained(folder), target)


def _in_memory(folder: Path, plan, out: Path, dtype="float32"):
    model, tokenizer = load_model(ModelConfig(source=str(folder), dtype=dtype))
    apply_plan_(model, plan)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in IGNORED_CONFIG_KEYS}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_streaming_equals_in_memory_prune(model_type, tmp_path):
    source = _save(tmp_path / "source", model_type)
    _, plan = _plan(source)
    model = _in_memory(source, plan, tmp_path / "memory")
    # tiny row blocks: the vocabulary tensors are produced in many pieces
    report = write_pruned_checkpoint(source, plan, tmp_path / "stream", max_chunk_bytes=512)
    out = tmp_path / "stream"
    assert report["shards"] == ["model.safetensors"] and report["skipped"] >= 1
    memory = _tensors(tmp_path / "memory")
    _assert_same_tensors(_tensors(out), memory)
    assert report["tensors"] == len(memory) and report["total_size"] == sum(t.nbytes for t in memory.values())
    assert ("lm_head.weight" in memory) == (not model.config.tie_word_embeddings)
    assert _json(out / "config.json") == _json(tmp_path / "memory" / "config.json")
    assert _json(out / "generation_config.json") == _json(tmp_path / "memory" / "generation_config.json")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    record = json.loads((out / "minicompress.json").read_text())
    assert record["streaming"] is True and record["plan"] == plan.to_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_pruned_config_equals_the_saved_config(tmp_path):
    source = _save(tmp_path / "source", "gemma3_text")
    _, plan = _plan(source)
    _in_memory(source, plan, tmp_path / "memory")
    new = streaming.pruned_config(AutoConfig.from_pretrained(source), plan, torch.float32)
    new.save_pretrained(tmp_path / "cfg")
    assert _json(tmp_path / "cfg" / "config.json") == _json(tmp_path / "memory" / "config.json")
    assert new.layer_types == json.loads((tmp_path / "memory" / "config.json").read_text())["layer_types"]


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    source = _save(tmp_path / "source", "qwen3", dtype=torch.bfloat16)
    _, plan = _plan(source)
    _in_memory(source, plan, tmp_path / "memory", dtype="bfloat16")
    write_pruned_checkpoint(source, plan, tmp_path / "stream")
    tensors = _tensors(tmp_path / "stream")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    _assert_same_tensors(tensors, _tensors(tmp_path / "memory"))
    assert _json(tmp_path / "stream" / "config.json") == _json(tmp_path / "memory" / "config.json")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_sharded_source_and_sharded_output(model_type, tmp_path):
    single = _save(tmp_path / "single", model_type)
    sharded = _save(tmp_path / "sharded", model_type, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    _, plan = _plan(single)
    write_pruned_checkpoint(single, plan, tmp_path / "a")
    report = write_pruned_checkpoint(sharded, plan, tmp_path / "b", max_shard_bytes=8000)
    out = tmp_path / "b"
    reference = _tensors(tmp_path / "a")
    _assert_same_tensors(_tensors(out), reference)
    # several output shards, each at most the budget unless one tensor is larger, and a correct index
    assert len(report["shards"]) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(reference)
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in reference.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            assert name in f.keys()
    for shard in report["shards"]:
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 8000 or len(sizes) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_ids()).logits, direct(_ids()).logits)


class _Tracker:
    """Wraps ``safe_open`` and ``slice_parameter`` in :mod:`minicompress.pruning.streaming` to
    record how many real (non-meta) source and pruned tensors are alive at each step."""

    def __init__(self):
        self.sources, self.outputs = 0, 0
        self.reads = []  # (name, bytes, live sources, live outputs) before each read
        self.writes = []  # (live sources, live outputs) at each write

    def _born(self, tensor, kind):
        setattr(self, kind, getattr(self, kind) + 1)
        weakref.finalize(tensor, lambda: setattr(self, kind, getattr(self, kind) - 1))
        return tensor

    def safe_open(self, path, framework):
        tracker, handle = self, safe_open(path, framework=framework)

        class _Slice:
            def __init__(self, name):
                self._name, self._slice = name, handle.get_slice(name)

            def __getattr__(self, attr):
                return getattr(self._slice, attr)

            def __getitem__(self, item):
                tracker.reads.append((self._name, None, tracker.sources, tracker.outputs))
                return tracker._born(self._slice[item], "sources")

        class _Handle:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, name):
                return _Slice(name)

            def get_tensor(self, name):
                tracker.reads.append((name, None, tracker.sources, tracker.outputs))
                return tracker._born(handle.get_tensor(name), "sources")

        handle.__enter__()
        return _Handle()

    def slice_parameter(self, name, tensor, plan, adapter=None):
        from minicompress.pruning.plan import slice_parameter

        result = slice_parameter(name, tensor, plan, adapter)
        if result is not None and not result[1].is_meta:
            self._born(result[1], "outputs")
        return result


def test_at_most_one_source_tensor_is_alive_and_nothing_is_buffered(tmp_path, monkeypatch):
    source = _save(tmp_path / "source", "mistral")  # untied lm_head: two row-blocked tensors
    _, plan = _plan(source)
    tracker = _Tracker()
    monkeypatch.setattr(streaming, "safe_open", tracker.safe_open)
    monkeypatch.setattr(streaming, "slice_parameter", tracker.slice_parameter)
    write = outputs._write_tensor

    def recording_write(handle, tensor):
        tracker.writes.append((tracker.sources, tracker.outputs))
        return write(handle, tensor)

    monkeypatch.setattr(outputs, "_write_tensor", recording_write)
    write_pruned_checkpoint(source, plan, tmp_path / "out", max_chunk_bytes=1024,
                                         max_shard_bytes=1 << 30)
    names = [r[0] for r in tracker.reads]
    assert len(tracker.writes) == len(tracker.reads) > 0
    # every read happens with no other source or pruned tensor alive; every write holds
    # exactly the one pruned tensor being written (its source already released)
    assert all(sources == 0 and outputs == 0 for _, _, sources, outputs in tracker.reads)
    assert all(w == (0, 1) for w in tracker.writes)
    # the [256, 32] float32 embedding (32 KiB) and lm_head are read in 1 KiB row blocks
    assert names.count("model.embed_tokens.weight") == names.count("lm_head.weight") == 32
    assert tracker.sources == tracker.outputs == 0
    _assert_same_tensors(_tensors(tmp_path / "out"), _tensors(_reference(source, plan, tmp_path)))


def _reference(source, plan, tmp_path):
    _in_memory(source, plan, tmp_path / "memory")
    return tmp_path / "memory"


def test_plan_for_another_checkpoint_is_refused(tmp_path):
    source = _save(tmp_path / "source", "llama")
    other = tmp_path / "other"
    make_tiny_model("llama", num_hidden_layers=2).save_pretrained(other)
    _, plan = _plan(source)
    with pytest.raises(MinicompressError, match="--streaming: the plan is for"):
        write_pruned_checkpoint(other, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _score_cli(tmp_path, model_dir, corpus):
    out = tmp_path / "scores"
    assert main(["score", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "16", "--num-samples", "8",
                 "--batch-size", "4", "--loss-samples", "4", "--output", str(out)]) == 0
    return out


def test_cli_streaming_prune_matches_in_memory_prune(tmp_path, tiny_model_dir, text_corpus, capsys):
    model_dir = tiny_model_dir("qwen2", num_hidden_layers=3)
    scores = _score_cli(tmp_path, model_dir, text_corpus)
    sizes = ["--hidden-size", "24", "--num-attention-heads", "2", "--num-key-value-heads", "1",
             "--intermediate-size", "40", "--num-hidden-layers", "2"]
    common = ["prune", "--model", str(model_dir), "--scores", str(scores), *sizes]
    assert main([*common, "--output", str(tmp_path / "memory")]) == 0
    assert main([*common, "--streaming", "--output", str(tmp_path / "stream")]) == 0
    assert "pruned" in capsys.readouterr().out
    _assert_same_tensors(_tensors(tmp_path / "stream"), _tensors(tmp_path / "memory"))
    assert _json(tmp_path / "stream" / "config.json") == _json(tmp_path / "memory" / "config.json")
    memory = json.loads((tmp_path / "memory" / "minicompress.json").read_text())
    stream = json.loads((tmp_path / "stream" / "minicompress.json").read_text())
    assert stream["streaming"] is True and stream["config"]["streaming"] is True
    for key in ("plan", "parameters", "original", "pruned", "scores_digest", "source_model", "command"):
        assert stream[key] == memory[key], key


def test_cli_streaming_refusals(tmp_path, tiny_model_dir, text_corpus, capsys):
    model_dir = tiny_model_dir("llama", num_hidden_layers=3)
    scores = _score_cli(tmp_path, model_dir, text_corpus)
    (tmp_path / "exists").mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    base = ["prune", "--streaming", "--hidden-size", "24"]
    cases = [  # (args, expected fragments of the one-line error)
        ([*base, "--model", str(model_dir), "--output", str(tmp_path / "o1")],
         ("--streaming", "--scores", "minicompress score")),
        (["prune", "--streaming", "--model", str(model_dir), "--scores", str(scores), "--target-params", "0.5",
          "--output", str(tmp_path / "o2")], ("--streaming", "--target-params")),
        ([*base, "--model", str(no_weights), "--scores", str(scores), "--output", str(tmp_path / "o3")],
         ("--streaming", "safetensors")),
        ([*base, "--model", str(model_dir), "--scores", str(scores), "--output", str(tmp_path / "exists")],
         ("already exists", "--overwrite")),
    ]
    capsys.readouterr()
    for args, fragments in cases:
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and all(f in err for f in fragments), err
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))
    assert not any((tmp_path / "exists").iterdir())
