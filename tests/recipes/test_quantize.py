"""``minicompress quantize``: a saved, reloadable quantized folder; refusals leave nothing on disk."""

from __future__ import annotations

import json

import pytest
import torch

from minicompress import quantize as quantize_module
from minicompress.cli import main
from minicompress.config import ModelConfig, QuantizeConfig
from minicompress.errors import MinicompressError
from minicompress.models import load_model
from minicompress.quantize import quantize_
from minicompress.evaluation.perplexity import evaluate_model
from minicompress.recipes.quantize import quantize

pytest.importorskip("torchao")

IDS = torch.randint(4, 220, (2, 24), generator=torch.Generator().manual_seed(0))


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("scheme,dtype", [("int8-weight-only", "float32"), ("int4-weight-only", "bfloat16")])
def test_the_saved_folder_reloads_with_plain_from_pretrained_to_the_same_logits(tmp_path, tiny_model_dir, scheme,
                                                                                dtype):
    from transformers import AutoModelForCausalLM

    source = tiny_model_dir("llama")
    report = quantize(QuantizeConfig(model=ModelConfig(source=str(source), dtype=dtype), scheme=scheme,
                                     output=str(tmp_path / "q")))
    # the same model quantized in memory
    model, _ = load_model(ModelConfig(source=str(source), dtype=dtype))
    quantize_(model, scheme)
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        assert type(reloaded.model.layers[1].mlp.down_proj.weight) is type(model.model.layers[1].mlp.down_proj.weight)
        assert torch.equal(reloaded(IDS).logits, expected)
        # what minicompress eval loads: the saved dtype and the torchao config are kept
        loaded, _ = load_model(ModelConfig(source=str(tmp_path / "q")))
        assert loaded.dtype == getattr(torch, dtype) and loaded.config.quantization_config.quant_method.value == "torchao"
        assert torch.equal(loaded(IDS).logits, expected)
    # safetensors only, with torchao's metadata; the tokenizer and the provenance record next to it
    names = _listing(tmp_path / "q")
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert {"config.json", "tokenizer.json", "minicompress.json", "minicompress.yaml"} <= set(names)
    assert _listing(tmp_path) == sorted([source.name, "q"])  # no temporary folder left
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["model.layers.0.mlp.up_proj.weight"])
        assert meta["_type"] == ("Int8Tensor" if scheme == "int8-weight-only" else "IntxUnpackedToInt8Tensor")
        assert f.get_tensor("model.layers.0.mlp.up_proj._weight_qdata").dtype == torch.int8
    record = json.loads((tmp_path / "q" / "minicompress.json").read_text())
    assert record["command"] == "quantize" and record["config"]["scheme"] == scheme
    assert record["quantized_linears"] == 14 and record["source_model"] == str(source)
    weights = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert report["size_after_bytes"] == record["size_after_bytes"] == weights
    assert report["size_before_bytes"] == (source / "model.safetensors").stat().st_size
    assert report["size_after_bytes"] < report["size_before_bytes"]


def test_cli_end_to_end_then_eval_reports_size_speed_and_perplexity(tmp_path, tiny_model_dir, text_corpus, capsys):
    source = tiny_model_dir("llama")
    out, report_json = tmp_path / "q4", tmp_path / "q4.json"
    assert main(["quantize", "--model", str(source), "--scheme", "int4-weight-only", "--group-size", "16",
                 "--output", str(out), "--json", str(report_json), "-q"]) == 0
    shown = capsys.readouterr().out
    assert "size on disk before" in shown and "size on disk after" in shown and "int4-weight-only" in shown
    report = json.loads(report_json.read_text())
    assert report["group_size"] == 16 and report["size_after_bytes"] == (out / "model.safetensors").stat().st_size
    assert main(["eval", "--model", str(out), "--data", str(text_corpus), "--seq-len", "32", "--prefill-tokens", "8",
                 "--decode-tokens", "2", "--output", str(tmp_path / "eval.json"), "-q"]) == 0
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results["size_on_disk_bytes"] == report["size_after_bytes"]
    assert results["prefill_tokens_per_s"] > 0 and results["decode_tokens_per_s"] > 0
    # the perplexity is the quantized model's: the in-memory quantized model scores the same text alike
    model, tokenizer = load_model(ModelConfig(source=str(source)))
    float_ppl = evaluate_model(model, tokenizer, str(text_corpus), seq_len=32, autocast="none")["perplexity"]
    quantize_(model, "int4-weight-only", 16)
    ppl = evaluate_model(model, tokenizer, str(text_corpus), seq_len=32, autocast="none")["perplexity"]
    assert results["perplexity"] == pytest.approx(ppl, rel=1e-6) and ppl != pytest.approx(float_ppl, rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int3"], "argument --scheme: invalid choice: 'int3' (choose from 'int8-weight-only', "
                           "'int4-weight-only')"),
    (["--group-size", "48"], "--group-size (group_size): 48 does not divide in_features=32"),
    (["--group-size", "0"], "--group-size (group_size): must be a number > 0, got 0"),
    (["scheme=int2"], "scheme: 'int2' is not allowed; choose one of int8-weight-only, int4-weight-only"),
])
def test_refused_commands_leave_nothing_on_disk(tmp_path, tiny_model_dir, capsys, args, message):
    source = tiny_model_dir("llama")
    work = tmp_path / "work"
    work.mkdir()
    assert main(["quantize", "--model", str(source), "--output", str(work / "q"), "--json", str(work / "q.json"),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert _listing(work) == []


def test_an_existing_output_is_kept_without_overwrite_and_replaced_with_it(tmp_path, tiny_model_dir, capsys):
    source = tiny_model_dir("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "--model", str(source), "--output", str(out)]) == 2
    assert "--output: " in capsys.readouterr().err and _listing(out) == ["keep.txt"]
    assert _listing(tmp_path) == [source.name, "q"]
    assert main(["quantize", "--model", str(source), "--output", str(out), "--overwrite", "-q"]) == 0
    assert "keep.txt" not in _listing(out) and "model.safetensors" in _listing(out)


def test_without_torchao_the_command_is_refused_before_loading(tmp_path, tiny_model_dir, capsys, monkeypatch):
    source = tiny_model_dir("llama")
    real = quantize_module.importlib.util.find_spec
    monkeypatch.setattr(quantize_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(MinicompressError, match=r"^quantize needs torchao: pip install 'minicompress\[quantize\]'"):
        quantize(QuantizeConfig(model=ModelConfig(source=str(source)), output=str(tmp_path / "q")))
    assert main(["quantize", "--model", str(source), "--output", str(tmp_path / "q")]) == 2
    assert "quantize needs torchao" in capsys.readouterr().err
    assert _listing(tmp_path) == [source.name]


def test_a_quantized_model_is_not_quantized_again(tmp_path, tiny_model_dir):
    source = tiny_model_dir("llama")
    quantize(QuantizeConfig(model=ModelConfig(source=str(source)), output=str(tmp_path / "q")))
    with pytest.raises(MinicompressError, match=r"^--model .*: it is quantized already \(torchao\)"):
        quantize(QuantizeConfig(model=ModelConfig(source=str(tmp_path / "q")), output=str(tmp_path / "qq")))
    assert not (tmp_path / "qq").exists()


def test_a_quantized_model_is_neither_pruned_nor_trained(tmp_path, tiny_model_dir, text_corpus, capsys):
    source = tiny_model_dir("llama")
    quantize(QuantizeConfig(model=ModelConfig(source=str(source)), output=str(tmp_path / "q")))
    assert main(["prune", "--model", str(tmp_path / "q"), "--intermediate-size", "32", "--data", str(text_corpus),
                 "--seq-len", "16", "--output", str(tmp_path / "p")]) != 0
    assert "a torchao-quantized model cannot be pruned" in capsys.readouterr().err
    assert main(["recover", "--student", str(tmp_path / "q"), "--teacher", str(source), "--data", str(text_corpus),
                 "--seq-len", "16", "--tokens", "64", "global_batch_tokens=64", "--output", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err
    assert "--student" in err and "cannot be trained" in err, err
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob("r*")) and not list(tmp_path.glob("p*"))


def test_loading_a_quantized_folder_without_torchao_is_a_one_line_error(tmp_path, tiny_model_dir, monkeypatch):
    source = tiny_model_dir("llama")
    quantize(QuantizeConfig(model=ModelConfig(source=str(source)), output=str(tmp_path / "q")))
    real = quantize_module.importlib.util.find_spec
    monkeypatch.setattr(quantize_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(MinicompressError, match=r"^--model .*q: it is quantized with torchao; pip install"):
        load_model(ModelConfig(source=str(tmp_path / "q")))
