"""Tests for recovery and scoring on several ranks (torchrun + FSDP2, gloo on the CPU).

Two processes on the loopback interface (``127.0.0.1``), one thread each, a tiny llama
(tied embeddings) from conftest. The two-rank runs must equal one process on the same
global batch: per-step losses to ``rtol=1e-4``, final weights to ``rtol=1e-4, atol=1e-6``
(the only differences are float32 summation orders: micro-batch gradients are summed per
rank, then over ranks; measured: 3e-8 relative on losses, 1e-7 absolute on weights that
moved by 3e-2); scores to ``rtol=1e-5``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minicompress import checkpoint
from minicompress.recipes import recover as recover_recipe
from minicompress.recipes.score import score
from minicompress.config import DataConfig, LossConfig, ModelConfig, RecoverConfig, ScoreConfig
from minicompress.pruning.scoring import ImportanceScores

SEQ = 16
LOSS_RTOL = 1e-5
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-6)


def _spawn(worker, args: tuple) -> None:
    """``mp.start_processes(worker, args=(port, *args), nprocs=2)``."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(_free_port(), *args), nprocs=2, start_method="spawn")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MINICOMPRESS_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*args: str, cwd: Path) -> None:
    """``torchrun --nproc-per-node 2 -m minicompress ARGS`` on 127.0.0.1, one thread per rank
    (a second try with another port if a parallel test session took the free port first)."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "minicompress", *args, "--threads", "1", "--quiet"]
        done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower() or attempt:
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher and student folders, a corpus, the recovery config, and one uninterrupted
    two-rank ``recover`` launched with torchrun (shared by the tests below)."""
    from conftest import corpus_text, make_tiny_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("distributed")
    folders = {}
    for name, seed, kw in (("teacher", 0, {}), ("student", 1, dict(hidden_size=16, intermediate_size=32))):
        folders[name] = root / name
        make_tiny_model("llama", seed=seed, **kw).save_pretrained(folders[name])
        make_tiny_tokenizer().save_pretrained(folders[name])
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(40) + "\n")
    # 4 steps of 4 sequences: 1 micro batch of 1 sequence per rank and micro step, 2 micro steps per rank
    config = RecoverConfig(
        student=ModelConfig(source=str(folders["student"])), teacher=ModelConfig(source=str(folders["teacher"])),
        data=DataConfig(source=str(corpus), seq_len=SEQ), tokens=4 * 4 * SEQ, global_batch_tokens=4 * SEQ,
        micro_batch_size=1, lr=1e-2, warmup_steps=1, eval_tokens=5 * SEQ, eval_every=2, eval_batch_size=2,
        autocast="none", loss=LossConfig(kl_weight=1.0, ce_weight=0.3), output=str(root / "two"))
    yaml = root / "recover.yaml"
    yaml.write_text(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "output"}))
    _torchrun("recover", "--config", str(yaml), "--output", str(root / "two"), cwd=root)
    return {"root": root, "config": config, "folders": folders, "corpus": corpus}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(found: Path, expected: Path) -> None:
    got, ref = _records(found), _records(expected)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [0, 1, 2, 3, 4]
    for a, b in zip(got, ref):
        for key in ("loss", "kl", "ce", "grad_norm", "eval_nll", "eval_kl_to_teacher", "eval_top1_agreement"):
            assert (key in a) == (key in b), key
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL), (a["step"], key)
    w_got, w_ref = load_file(str(found / "model.safetensors")), load_file(str(expected / "model.safetensors"))
    assert sorted(w_got) == sorted(w_ref)
    for name in w_ref:
        torch.testing.assert_close(w_got[name], w_ref[name], **WEIGHT_TOL, msg=name)


def test_two_ranks_equal_one_process_on_the_same_global_batch(setup):
    from transformers import AutoModelForCausalLM

    two = setup["root"] / "two"
    one = setup["root"] / "one"
    recover_recipe.recover(dataclasses.replace(setup["config"], output=str(one)))
    _assert_same_run(two, one)
    record = json.loads((two / "minicompress.json").read_text())["recovery"]
    assert record["world_size"] == 2 and record["steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(two)  # a stock HF folder, embeddings still tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((two / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert _records(two)[-1]["loss"] < _records(two)[1]["loss"]


class _Killed(RuntimeError):
    pass


def _leave_group() -> None:
    """Leave the group together as the CLI does after a command succeeded."""
    from minicompress import distributed

    distributed.finish()


def _killed_worker(rank: int, port: int, config: RecoverConfig, kill_after: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MINICOMPRESS_PROGRESS="0")
    torch.set_num_threads(1)

    def kill(record):
        if record["step"] == kill_after:
            raise _Killed

    try:
        recover_recipe.recover(config, callback=kill)
    except _Killed:
        pass
    _leave_group()


def test_two_rank_checkpoint_resumes_on_two_ranks_and_in_one_process(setup):
    output = setup["root"] / "resumed"
    # the memory knobs change no number: the first run recomputes activations and keeps gathered layers
    config = dataclasses.replace(setup["config"], output=str(output), save_every=1, checkpoint_keep=2,
                                 activation_checkpointing=True, reshard_after_forward=False)
    _spawn(_killed_worker, (config, 2))
    work = checkpoint.working_folder(output)
    assert checkpoint.latest_checkpoint(work).name == "checkpoint-00000002"
    config = dataclasses.replace(config, resume=True, activation_checkpointing=False, reshard_after_forward=True)
    _spawn(_killed_worker, (config, 3))
    assert not output.exists() and checkpoint.latest_checkpoint(work).name == "checkpoint-00000003"
    saved = json.loads((checkpoint.latest_checkpoint(work) / "state.json").read_text())
    assert saved["world_size"] == 2 and saved["data_position"] == 3 * 4

    result = recover_recipe.recover(config)  # one process, no process group
    assert result["resumed_from_step"] == 3
    _assert_same_run(output, setup["root"] / "two")
    assert not work.exists()


def _rank0_reads_worker(rank: int, port: int, config: RecoverConfig) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MINICOMPRESS_PROGRESS="0")
    torch.set_num_threads(1)
    if rank:  # any read of the weights on rank 1 fails the run
        from minicompress import models

        def refuse(*args, **kwargs):
            raise AssertionError("rank 1 read a checkpoint")

        models.load_model = refuse
    recover_recipe.recover(config)
    _leave_group()


def test_only_rank_zero_reads_the_weights_and_the_run_is_unchanged(setup):
    """Rank 1 builds student and teacher on the meta device and gets its shards from rank 0
    (its ``load_model`` raises); the run equals the torchrun one, losses and weights."""
    output = setup["root"] / "rank0-reads"
    _spawn(_rank0_reads_worker, (dataclasses.replace(setup["config"], output=str(output)),))
    _assert_same_run(output, setup["root"] / "two")


def _broadcast_worker(rank: int, port: int, folder: str, lazy: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MINICOMPRESS_PROGRESS="0")
    torch.set_num_threads(1)
    from minicompress import distributed
    from minicompress.models import SafetensorsWeights, load_model, load_model_on_rank0

    distributed.init_from_env()
    distributed.BROADCAST_BLOCK_BYTES = 300  # a few rows per block: every tensor goes in several blocks
    model, _, weights = load_model_on_rank0(folder)
    if rank == 0:
        assert isinstance(weights, SafetensorsWeights)
        if not lazy:  # the fallback: a loaded model's state dict, emptied as it is sent
            weights = dict(load_model(folder)[0].state_dict())
    distributed.shard_model(model, mixed_precision=False, device="cpu", from_rank0=True, weights=weights)
    if rank == 0 and not lazy:
        assert weights == {}
    full = distributed.full_state_dict(model)
    if rank == 0:
        torch.save({k: v.clone() for k, v in full.items()}, out)
    _leave_group()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("lazy", [True, False])
def test_weights_broadcast_in_blocks_equal_a_plain_load(tmp_path, model_type, lazy):
    """Odd row counts (37 FFN rows: 19 + 18 per rank), tied (llama) and untied (qwen3)
    embeddings, blocks of 2-9 rows: the gathered shards equal ``load_model``'s tensors."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    from minicompress.models import load_model

    folder = tmp_path / "model"
    make_tiny_model(model_type, seed=3, intermediate_size=37).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "gathered.pt"
    _spawn(_broadcast_worker, (str(folder), lazy, str(out)))
    gathered = torch.load(out, weights_only=True)
    expected = load_model(str(folder))[0].state_dict()
    assert gathered.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor), name


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_empty_model_has_no_weights_and_real_buffers(model_type):
    from conftest import make_tiny_model, tiny_config
    from transformers import AutoModelForCausalLM

    from minicompress import distributed
    from minicompress.models import _parameters_on_meta

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    reference = dict(make_tiny_model(model_type).named_buffers())  # RoPE inv_freq is computed, not loaded
    assert buffers.keys() == reference.keys() and buffers
    for name, buf in reference.items():
        assert torch.equal(buffers[name], buf), name
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone
    with pytest.raises(ValueError, match="from_rank0=True"):
        distributed.shard_model(model, mixed_precision=False, device="cpu")


def test_two_rank_scores_equal_one_process_scores(setup):
    root = setup["root"]
    common = dict(model=ModelConfig(source=str(setup["folders"]["teacher"])), num_samples=10, batch_size=2,
                  loss_samples=6, autocast="none", data=DataConfig(source=str(setup["corpus"]), seq_len=SEQ))
    _torchrun("score", "--model", str(setup["folders"]["teacher"]), "--data", str(setup["corpus"]),
              "--seq-len", str(SEQ), "--num-samples", "10", "--batch-size", "2", "--loss-samples", "6",
              "--score-autocast", "none", "--output", str(root / "scores-two"), cwd=root)
    one = score(ScoreConfig(**common, output=str(root / "scores-one")))
    two = ImportanceScores.load(root / "scores-two")
    assert two.meta["num_samples"] == one.meta["num_samples"] == 10
    assert two.meta["loss_samples"] == 6
    assert two.meta["fsdp"] is True and two.meta["world_size"] == 2  # 5 batches and 3 loss batches: rank 1 idles once
    assert one.meta["fsdp"] is False
    for name, expected in one.tensors().items():
        torch.testing.assert_close(two.tensors()[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert two.base_loss == pytest.approx(one.base_loss, rel=1e-6)


FAILING_RANK = """
import torch, torch.distributed as dist
from minicompress import distributed
distributed.init_from_env()
if dist.get_rank() == 1:
    raise RuntimeError("rank 1 fails")
dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone
"""


def test_a_failing_rank_ends_the_torchrun_job_at_once(tmp_path):
    """A rank that raises tears down without waiting for its peers (no barrier at exit), so
    torchrun sees the failure within seconds instead of after the 30-minute collective timeout."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script)]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=90)
    assert done.returncode != 0 and "rank 1 fails" in done.stderr
    assert time.monotonic() - start < 60


def test_run_under_torchrun_equals_one_process(setup, tmp_path):
    """``torchrun -m minicompress run``: every rank scores its share and prunes alike, rank 0
    writes; recovery is sharded; the final stage equals a single-process run."""
    from minicompress.recipes.run import run

    folders, corpus = setup["folders"], setup["corpus"]
    recover = dict(global_batch_tokens=4 * SEQ, micro_batch_size=1, lr=1e-2, warmup_steps=1, eval_tokens=5 * SEQ,
                   eval_batch_size=2, autocast="none", save_every=2)
    config = {"model": {"source": str(folders["teacher"])}, "data": {"source": str(corpus), "seq_len": SEQ},
              "score": {"num_samples": 8, "batch_size": 2, "loss_samples": 0, "autocast": "none"},
              "recover": recover, "report": {"speed": False, "autocast": "none"},
              "repair": ["none"],  # torchrun prunes explicit sizes tensor by tensor: no repair to compare
              "stages": [{"name": "small", "target": {"intermediate_size": 32, "num_hidden_layers": 2},
                          "tokens": 4 * 4 * SEQ}]}
    yaml = tmp_path / "run.yaml"
    yaml.write_text(json.dumps(config))
    _torchrun("run", str(yaml), "--output", str(tmp_path / "two"), cwd=tmp_path)
    # explicit sizes of a local folder: scored with FSDP2 shards, sliced tensor by tensor on rank 0
    student_record = json.loads((tmp_path / "two" / "stage-1-small" / "minicompress.json").read_text())
    assert student_record["streaming"] is True and student_record["command"] == "prune"
    one = run(str(yaml), {"output": str(tmp_path / "one")})
    two_final = load_file(str(tmp_path / "two" / "stage-1-small" / "model.safetensors"))
    one_final = load_file(str(Path(one["stages"][-1]["folder"]) / "model.safetensors"))
    assert two_final.keys() == one_final.keys()
    for key in one_final:
        torch.testing.assert_close(two_final[key], one_final[key], **WEIGHT_TOL)
    assert (tmp_path / "two" / "report.json").is_file()
