"""Repairs of a pruned model (:mod:`minicompress.pruning.repair`), each against a naive
float64 ``torch.linalg.lstsq`` of the same problem, built here from the original model's
own modules; keep-everything repairs change nothing; a span map over an identity span is
the identity; repaired outputs reload in plain transformers; bad input is one line and
writes nothing."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from minicompress.arch import decoder_layers
from minicompress.cli import main
from minicompress.errors import MinicompressError
from minicompress.pruning import repair as rp
from minicompress.pruning.plan import apply_plan_, make_plan
from minicompress.pruning.scoring import score_model


def _batches(n=6, b=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (b, t), generator=g) for _ in range(n)]


def _naive(x, y, damping, prior=None, intercept=False, scale="mean"):
    """float64 ``lstsq`` of ``min ||X W^T (+ b) - Y||^2 + sum_i lam_i ||W[:, i] - P[:, i]||^2`` as
    one augmented system (``lam_i = damping * mean(diag(Xc^T Xc))``, or ``damping * (Xc^T Xc)_ii``
    for ``scale="diagonal"``; ``Xc`` centred when fitting ``b``)."""
    x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
    xc = x - x.mean(0) if intercept else x
    energy = (xc * xc).sum(0)
    lam = damping * (energy if scale == "diagonal" else energy.mean().expand_as(energy))
    n_in = x.shape[1]
    p = torch.zeros(y.shape[1], n_in, dtype=torch.float64) if prior is None else prior.double()
    a = torch.cat([x, torch.diag(lam.sqrt())])
    rhs = torch.cat([y, lam.sqrt()[:, None] * p.T])
    if intercept:
        a = torch.cat([a, torch.cat([torch.ones(x.shape[0], 1), torch.zeros(n_in, 1)]).double()], 1)
    sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return (sol[:n_in].T, sol[n_in]) if intercept else (sol.T, None)


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny_model("llama", num_hidden_layers=3)
    batches = _batches()
    return model, batches, score_model(model, batches)


def _pruned(model, scores, target, repairs=("refit",), bias=(), damping=(0.01,), **kw):
    student = copy.deepcopy(model)
    plan = make_plan(scores, model.config, target)
    teacher = rp.teacher_weights(student, plan)
    apply_plan_(student, plan)
    if bias:
        rp.add_biases_(student, bias)
    records = rp.refit_layers_(student, teacher, plan, _batches(), rp.RefitSettings(
        refit="refit" in repairs, refit_o="refit_o" in repairs, bias=tuple(bias), damping=damping, **kw))
    return student, plan, records


# ----------------------------------------------------------------------------------------
# the solver


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("centre", ["zero", "pruned"])
@pytest.mark.parametrize("scale", ["mean", "diagonal"])
def test_refit_linear_matches_naive_lstsq_on_random_data(damping, centre, scale):
    g = torch.Generator().manual_seed(1)
    x, w0 = torch.randn(300, 12, generator=g), torch.randn(5, 12, generator=g)
    x[:, 3] *= 100.0  # a massive activation: scales differ by 10^4 in energy
    y = x @ torch.randn(12, 5, generator=g) + 0.1 * torch.randn(300, 5, generator=g)
    prior = w0 if centre == "pruned" else None
    got = rp.refit_linear(x, y, w0.double(), damping=damping, prior=prior, scale=scale)
    want, _ = _naive(x, y, damping, prior, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_mean_damping_shrinks_the_ordinary_inputs_next_to_a_massive_one_and_diagonal_does_not():
    """The smoke run's finding in miniature: one input with most of the energy makes
    ``lambda = damping * mean(diag)`` large for every other input."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 20, generator=g)
    x[:, 0] *= 300.0
    w = torch.randn(6, 20, generator=g)
    y = x @ w.T
    mean = rp.refit_linear(x, y, w, damping=0.01)
    diagonal = rp.refit_linear(x, y, w, damping=0.01, scale="diagonal")
    assert (mean[:, 1:].norm() / w[:, 1:].norm()) < 0.5
    assert (diagonal[:, 1:].norm() / w[:, 1:].norm()) > 0.98


def test_streamed_statistics_equal_one_batch_and_the_intercept_is_naive_lstsq():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 10, generator=g) + 3.0
    y = x @ torch.randn(10, 4, generator=g) + torch.tensor([1.0, -2.0, 0.5, 4.0])
    w0 = torch.randn(4, 10, generator=g)
    whole, parts = rp.GramAccumulator(10, 4), rp.GramAccumulator(10, 4)
    whole.update(x, y)
    for i in range(0, 400, 64):
        parts.update(x[i:i + 64], y[i:i + 64])
    for d in (0.0, 0.05):
        w1, b1 = whole.solve(w0, damping=d, bias=True)
        w2, b2 = parts.solve(w0, damping=d, bias=True)
        wn, bn = _naive(x, y, d, intercept=True)
        torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(w1, wn, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(b1, bn, rtol=1e-8, atol=1e-8)
        # the error of the closed form is the error of the residual
        res = (x.double() @ w1.T + b1 - y.double()).square().sum() / y.double().square().sum()
        assert whole.error(w1, b1) == pytest.approx(float(res), rel=1e-8, abs=1e-12)
    # FLAP alone: weight kept, intercept = mean residual = W_dropped @ mean(x_dropped) without a shift
    w, b = whole.solve(w0, refit=False, bias=True)
    torch.testing.assert_close(w, w0.double())
    torch.testing.assert_close(b, (y.double() - x.double() @ w0.double().T).mean(0))


def test_keep_scale_keeps_the_row_norms_and_a_singular_system_is_one_line():
    g = torch.Generator().manual_seed(3)
    x, w0 = torch.randn(50, 6, generator=g), torch.randn(3, 6, generator=g)
    new = rp.refit_linear(x, 5 * x @ torch.randn(6, 3, generator=g), w0, damping=0.01, keep_scale=True)
    torch.testing.assert_close(new.norm(dim=1), w0.norm(dim=1))
    acc = rp.GramAccumulator(6, 3)
    acc.update(x[:2], x[:2, :3])  # 2 tokens, 6 inputs
    with pytest.raises(MinicompressError, match="^repair_damping: .*singular") as err:
        acc.solve(w0, damping=0.0)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------
# refits on a tiny llama, against lstsq on activations gathered from the original's modules


def _gather(student, original, batches, j, target_part):
    """For layer ``j`` of the repaired ``student``: its ``o_proj`` / ``down_proj`` inputs and
    what the original layer's attention / MLP (all heads / neurons) outputs on the
    student's same sublayer input."""
    s_layer, o_layer = decoder_layers(student)[j], decoder_layers(original)[j]
    part, proj = ("self_attn", "o_proj") if target_part == "attn" else ("mlp", "down_proj")
    xs, ys = [], []

    def student_in(module, args, kwargs):
        with torch.no_grad():
            out = getattr(o_layer, part)(*args, **kwargs)
        ys.append(out[0] if isinstance(out, tuple) else out)

    handles = [getattr(s_layer, part).register_forward_pre_hook(student_in, with_kwargs=True),
               getattr(getattr(s_layer, part), proj).register_forward_pre_hook(lambda m, a: xs.append(a[0]))]
    try:
        with torch.no_grad():
            for batch in batches:
                student.model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(xs).flatten(0, 1), torch.cat(ys).flatten(0, 1)


def test_sequential_refits_of_o_proj_and_down_proj_are_lstsq_on_the_students_own_input(tiny):
    model, batches, scores = tiny
    student, plan, records = _pruned(model, scores, {"intermediate_size": 24, "num_attention_heads": 2},
                                     repairs=("refit", "refit_o"), damping=(0.01,))
    assert plan.layers == (0, 1, 2)
    for j in range(3):
        for part, proj in (("attn", "o_proj"), ("mlp", "down_proj")):
            x, y = _gather(student, model, batches, j, part)  # the final student feeds layer j what the refit saw
            want, _ = _naive(x, y, 0.01)
            got = getattr(getattr(decoder_layers(student)[j], "self_attn" if part == "attn" else "mlp"), proj).weight
            torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)
            rec = records[j][proj]
            assert rec["error_after"] < rec["error_before"] and rec["tokens"] == 6 * 4 * 32


def test_flap_bias_and_the_joint_refit_are_lstsq_with_an_intercept(tiny):
    model, batches, scores = tiny
    for repairs in ((), ("refit",)):
        student, _, records = _pruned(model, scores, {"intermediate_size": 24, "num_attention_heads": 2},
                                      repairs=repairs, bias=("o_proj", "down_proj"))
        assert student.config.mlp_bias and student.config.attention_bias
        for j in range(3):
            layer = decoder_layers(student)[j]
            assert not layer.mlp.gate_proj.bias.any() and not layer.self_attn.q_proj.bias.any()
            x, y = _gather(student, model, batches, j, "mlp")
            down = layer.mlp.down_proj
            if repairs:
                want_w, want_b = _naive(x, y, 0.01, intercept=True)
                torch.testing.assert_close(down.weight.double(), want_w, rtol=2e-4, atol=2e-5)
            else:  # FLAP: kept weights untouched, bias = mean of what they miss
                plain = make_plan(scores, model.config, {"intermediate_size": 24}).neurons[j]
                torch.testing.assert_close(down.weight, decoder_layers(model)[j].mlp.down_proj.weight[:, list(plain)])
                want_b = (y.double() - x.double() @ down.weight.double().T).mean(0)
            torch.testing.assert_close(down.bias.double(), want_b, rtol=2e-4, atol=2e-5)
            assert records[j]["down_proj"]["error_after"] < records[j]["down_proj"]["error_before"]


def test_several_dampings_choose_per_linear_on_held_out_batches(tiny):
    model, _, scores = tiny
    _, _, records = _pruned(model, scores, {"intermediate_size": 24}, damping=(1e-4, 0.01, 10.0))
    for rec in records:
        errors = rec["down_proj"]["held_out_errors"]
        assert set(errors) == {"0.0001", "0.01", "10"}
        assert errors[f"{rec['down_proj']['damping']:g}"] == min(errors.values())


def test_keep_everything_repairs_change_nothing(tiny):
    model, batches, scores = tiny
    ids = batches[0]
    with torch.no_grad():
        want = model(ids).logits
    student, _, records = _pruned(model, scores, {}, repairs=("refit", "refit_o"), bias=("o_proj", "down_proj"),
                                  damping=(0.0,), skip_unpruned=False)  # solved: targets and inputs must align
    for name, p in model.named_parameters():
        torch.testing.assert_close(student.get_parameter(name), p, rtol=1e-5, atol=1e-6)
    for rec in records:
        for proj in ("o_proj", "down_proj"):
            assert rec[proj]["error_after"] < 1e-12 and rec[proj]["error_before"] < 1e-12
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, want, rtol=1e-4, atol=1e-5)
    # a channel prune (no neuron or head dropped) leaves nothing for a refit to do either
    student, _, _ = _pruned(model, scores, {"hidden_size": 24}, repairs=("refit", "refit_o"), damping=(0.0,),
                            skip_unpruned=False)
    plain = apply_plan_(copy.deepcopy(model), make_plan(scores, model.config, {"hidden_size": 24}))
    for name, p in plain.named_parameters():
        torch.testing.assert_close(student.get_parameter(name), p, rtol=1e-4, atol=1e-5)
    # by default such a linear is not solved at all: any damping would move it off its optimum
    student, _, records = _pruned(model, scores, {"intermediate_size": 24}, repairs=("refit", "refit_o"),
                                  damping=(0.3,))
    assert all(r["o_proj"] == {"skipped": "no input was pruned"} for r in records)
    for j, layer in enumerate(decoder_layers(student)):
        torch.testing.assert_close(layer.self_attn.o_proj.weight, decoder_layers(model)[j].self_attn.o_proj.weight,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma3_text", "mistral"])
def test_refits_run_on_every_family_and_lower_the_error(model_type):
    model = make_tiny_model(model_type, num_hidden_layers=4)
    scores = score_model(model, _batches())
    student, _, records = _pruned(model, scores, {"intermediate_size": 32, "num_attention_heads": 2},
                                  repairs=("refit", "refit_o"))
    for rec in records:
        for proj in ("o_proj", "down_proj"):
            assert rec[proj]["error_after"] < rec[proj]["error_before"]
    with torch.no_grad():
        assert torch.isfinite(student(_batches(1)[0]).logits).all()


# ----------------------------------------------------------------------------------------
# ReplaceMe


def test_span_map_is_lstsq_and_its_fold_is_exact(tiny):
    model, batches, scores = tiny
    plan = make_plan(scores, model.config, {"drop_layers": (1, 2)})
    assert rp.dropped_spans(plan) == [(0, 1, 2)]
    maps = rp.span_maps(model, plan, batches, damping=0.01)
    assert len(maps) == 1 and maps[0].error_after < maps[0].error_before
    # naive: the original's own modules, M = layer 0 MLP output, R = h_2 - (h_0 - M)
    seen = {}
    layers = decoder_layers(model)
    hs = [layers[0].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("m", []).append(o)),
          layers[0].register_forward_hook(lambda m, a, o: seen.setdefault("h", []).append(o)),
          layers[2].register_forward_hook(lambda m, a, o: seen.setdefault("l", []).append(o))]
    with torch.no_grad():
        for batch in batches:
            model.model(input_ids=batch)
    for h in hs:
        h.remove()
    m, h0, l2 = (torch.cat(seen[k]).flatten(0, 1).double() for k in ("m", "h", "l"))
    eye = torch.eye(m.shape[1], dtype=torch.float64)
    want_tt, _ = _naive(m, l2 - (h0 - m), 0.01, prior=eye)
    torch.testing.assert_close(maps[0].t, want_tt.T, rtol=1e-6, atol=1e-8)
    # the fold: layer 0 of the folded model outputs h_0 - M + M T, exactly
    folded = copy.deepcopy(model)
    rp.fold_span_maps_(folded, maps)
    out = []
    handle = decoder_layers(folded)[0].register_forward_hook(lambda mod, a, o: out.append(o))
    with torch.no_grad():
        for batch in batches:
            folded.model(input_ids=batch)
    handle.remove()
    torch.testing.assert_close(torch.cat(out).flatten(0, 1).double(), h0 - m + m @ maps[0].t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_a_span_map_over_an_identity_span_is_the_identity(tiny, damping):
    model, batches, scores = tiny
    model = copy.deepcopy(model)
    layer = decoder_layers(model)[1]
    with torch.no_grad():  # layer 1 outputs its input
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    plan = make_plan(scores, model.config, {"drop_layers": (1,)})
    (span,) = rp.span_maps(model, plan, batches, damping=damping)
    assert (span.into, span.first, span.last) == (0, 1, 1)
    torch.testing.assert_close(span.t, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-9)
    assert span.error_before < 1e-12 and span.error_after < 1e-12


# ----------------------------------------------------------------------------------------
# the prune command: provenance, reload, GGUF, bad input


@pytest.fixture
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("llama", num_hidden_layers=3)


def _prune_args(model_dir, corpus, out, *extra):
    return ["prune", "--model", str(model_dir), "--data", str(corpus), "--seq-len", "16", "--num-samples", "40",
            "--batch-size", "4", "--loss-samples", "0", "--output", str(out), *extra]


@pytest.mark.parametrize("repair", ["refit,refit_o,flap", "refit,replaceme"])
def test_repaired_prune_reloads_in_plain_transformers_to_the_same_logits(tmp_path, tiny_llama, text_corpus, repair):
    out, plain = tmp_path / "repaired", tmp_path / "plain"
    sizes = ["--intermediate-size", "40", "--num-attention-heads", "2", "--hidden-size", "24",
             "--drop-layers", "1"]
    assert main(_prune_args(tiny_llama, text_corpus, out, *sizes, "--repair", repair)) == 0
    assert main(_prune_args(tiny_llama, text_corpus, plain, *sizes, "--repair", "none")) == 0
    record = json.loads((out / "minicompress.json").read_text())["repair"]
    assert record["repairs"] == repair.split(",") and record["tokens"] == 40 * 16
    assert [r["original_layer"] for r in record["layers"]] == [0, 2]
    for r in record["layers"]:
        assert r["down_proj"]["error_after"] < r["down_proj"]["error_before"]
    if "replaceme" in repair:
        assert record["replaceme"][0]["layers"] == [1, 1] and record["replaceme"][0]["into_layer"] == 0
    else:
        assert record["flap"] == ["o_proj", "down_proj"]
        config = json.loads((out / "config.json").read_text())
        assert config["mlp_bias"] and config["attention_bias"]
    assert json.loads((plain / "minicompress.json").read_text())["repair"] is None
    # plain transformers, minicompress not importable: the same logits as minicompress's in-memory model
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys; sys.modules['minicompress'] = None\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
            f"with torch.no_grad(): torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)
    plain_model = AutoModelForCausalLM.from_pretrained(plain).eval()
    with torch.no_grad():
        assert not torch.allclose(plain_model(ids).logits, logits)  # the repair did change the weights
    _check_gguf_names(out)


def test_a_repair_with_nothing_to_repair_in_a_sublayer_records_the_skip(tmp_path, tiny_llama, text_corpus):
    out = tmp_path / "repaired"
    assert main(_prune_args(tiny_llama, text_corpus, out, "--intermediate-size", "40", "--repair",
                            "refit,refit_o,flap")) == 0
    record = json.loads((out / "minicompress.json").read_text())["repair"]
    assert record["flap"] == ["down_proj"]  # no head dropped: no o_proj bias, attention_bias stays off
    assert not json.loads((out / "config.json").read_text()).get("attention_bias")
    for r in record["layers"]:
        assert r["o_proj"] == {"skipped": "no input was pruned"} and r["down_proj"]["bias"]


def _converter() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$LLAMA_CPP_CONVERT``, or the source that
    ``benchmarks/serve_llamacpp.py`` unpacks under its cache (run with ``$LLAMA_CPP_PYTHON``)."""
    if os.environ.get("LLAMA_CPP_CONVERT"):
        return Path(os.environ["LLAMA_CPP_CONVERT"])
    cache = Path(os.environ.get("MINICOMPRESS_CACHE", Path.home() / ".cache" / "minicompress"))
    found = sorted(cache.glob("llamacpp/*/src/convert_hf_to_gguf.py"))
    return found[-1] if found else None


def _check_gguf_names(folder: Path) -> None:
    """Every tensor of ``folder`` has a GGUF name for llama.cpp's llama graph (the
    ``gguf`` package's tensor map, which ``convert_hf_to_gguf.py`` uses)."""
    gguf = pytest.importorskip("gguf")
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert names.get_name(key, try_suffixes=(".weight", ".bias")) is not None, key


def test_repaired_output_converts_to_gguf(tmp_path, text_corpus):
    """llama.cpp's converter on a repaired (refit + FLAP biases) tiny llama that speaks
    SmolLM2's tokenizer (the converter only knows published tokenizers)."""
    script = _converter()
    if script is None or not script.is_file():
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not here (set LLAMA_CPP_CONVERT, or run "
                    "benchmarks/serve_llamacpp.py once to unpack it); the tensor names are checked by the reload test")
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from minicompress.models import builtin_folder

    try:
        tokenizer = AutoTokenizer.from_pretrained(builtin_folder("smollm2-135m"))
    except MinicompressError as err:
        pytest.skip(f"SmolLM2's tokenizer: {err}")
    model_dir = tmp_path / "tiny-smollm2-vocab"
    make_tiny_model("llama", num_hidden_layers=2, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "repaired"
    assert main(_prune_args(model_dir, text_corpus, out, "--intermediate-size", "40", "--num-attention-heads", "2",
                            "--repair", "refit,refit_o,flap")) == 0
    target = tmp_path / "model.gguf"
    python = os.environ.get("LLAMA_CPP_PYTHON", sys.executable)  # one with sentencepiece, e.g. serve_llamacpp's venv
    done = subprocess.run([python, str(script), str(out), "--outtype", "f32", "--outfile", str(target)],
                          capture_output=True, text=True)
    if done.returncode and "No module named" in done.stderr:
        pytest.skip(f"the converter's dependencies are missing ({done.stderr.strip().splitlines()[-1]}); "
                    "set LLAMA_CPP_PYTHON to a Python that has them")
    assert done.returncode == 0, done.stderr[-2000:]
    tensors = {t.name: t for t in gguf.GGUFReader(str(target)).tensors}
    assert {"blk.0.ffn_down.bias", "blk.0.attn_output.bias", "blk.1.ffn_down.weight"} <= set(tensors)
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    got = torch.from_numpy(tensors["blk.0.ffn_down.bias"].data.copy()).reshape(-1)
    torch.testing.assert_close(got, weights["model.layers.0.mlp.down_proj.bias"])


@pytest.mark.parametrize("extra, match", [
    (["--repair", "refit,bogus"], "--repair (repair): 'bogus' is not a repair; choose auto, or from none, refit"),
    (["--repair", "none,refit"], "--repair (repair): 'none' cannot be combined"),
    (["--repair", "refit", "--repair-tokens", "32"], "--repair-tokens (repair_tokens): 32 calibration tokens are "
                                                     "fewer than the 40 inputs of down_proj"),
    (["--repair", "refit", "--num-samples", "2"], "--num-samples (score.num_samples): 32 calibration tokens"),
    (["--repair", "refit_o", "--repair-tokens", "16", "--num-attention-heads", "4"],
     "16 calibration tokens are fewer than the 32 inputs of o_proj (kept heads x head_dim)"),
    (["--repair", "refit", "--streaming"], "--repair (repair): a repair runs the loaded pruned model"),
    (["--repair", "replaceme", "--drop-layers", "0"], "--repair (repair): replaceme folds each dropped span"),
    (["--repair", "replaceme"], "--repair (repair): replaceme maps dropped layers and this prune drops none"),
    (["--repair", "refit", "--repair-damping", "-1"], "--repair-damping (repair_damping): must be a number >= 0"),
    (["--repair-keep-scale", "--repair", "flap"], "--repair-keep-scale (repair_keep_scale): applies to the refits"),
    (["--repair", "refit", "--repair-ridge", "one"], "invalid choice"),
])
def test_bad_repair_input_is_one_line_and_writes_nothing(tmp_path, tiny_llama, text_corpus, capsys, extra, match):
    out = tmp_path / "x"
    args = _prune_args(tiny_llama, text_corpus, out, "--intermediate-size", "40", "--num-attention-heads", "2")
    if "--num-samples" in extra:
        args = [a for i, a in enumerate(args) if a != "--num-samples" and args[i - 1] != "--num-samples"]
    if "--streaming" in extra:
        args += ["--scores", str(tmp_path / "none")]
    try:
        rc = main(args + extra)
    except SystemExit as exit_:  # argparse's choices
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert err.strip().count("\n") == 0 or "invalid choice" in err
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_flap_on_a_family_without_a_bias_key_is_refused_before_scoring(tmp_path, tiny_model_dir, text_corpus,
                                                                        capsys, monkeypatch):
    model_dir = tiny_model_dir("qwen2", num_hidden_layers=2)
    monkeypatch.setattr("minicompress.recipes.prune.score", lambda *a, **k: pytest.fail("scored"))
    rc = main(_prune_args(model_dir, text_corpus, tmp_path / "x", "--intermediate-size", "40", "--repair", "flap"))
    err = capsys.readouterr().err
    assert rc == 2 and "--repair (repair): flap adds a bias" in err and "qwen2 has none" in err
    assert err.strip().count("\n") == 0 and not (tmp_path / "x").exists()
