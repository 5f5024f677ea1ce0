"""Shared fixtures: tiny random models, a tiny tokenizer and a small text corpus.

Everything here is built in-process: no network, no real weights. Other test modules
(scoring, pruning, distillation) import these fixtures by name, so keep them stable.

Fixtures and helpers:
    TINY_MODEL_TYPES: the supported ``model_type`` values with a tiny config below.
    make_tiny_model(model_type, seed=0, **overrides): a plain function (also available as
        the ``make_tiny_model`` fixture) returning a seeded, float32, eval-mode
        ``*ForCausalLM`` with vocab 256, hidden 32, 2-3 layers, 4 query heads, 2 KV heads
        and head_dim 8 or 16. ``overrides`` replace config keys (``num_hidden_layers=4``).
        Gemma3: sliding_window 8, query_pre_attn_scalar 16, ``layer_types`` mixing
        sliding and full attention. Llama, qwen2 and gemma3 tie the embeddings; mistral
        and qwen3 do not.
    tiny_config(model_type, **overrides): the transformers config used above.
    make_tiny_tokenizer(add_bos=False): a ``PreTrainedTokenizerFast`` (BPE trained on the
        generated corpus, vocab < 256; ids: ``<unk>`` 0, ``<pad>`` 1, ``<s>`` 2, ``</s>`` 3).
        ``add_bos=True`` makes it prepend BOS like Gemma's tokenizer.
    tiny_tokenizer: fixture, ``make_tiny_tokenizer()`` (no BOS, like SmolLM2's).
    tiny_bos_tokenizer: fixture, ``make_tiny_tokenizer(add_bos=True)``.
    tiny_model_dir: fixture returning ``factory(model_type, add_bos=None, **overrides) -> Path``
        that saves a tiny model and tokenizer with ``save_pretrained`` under ``tmp_path``
        (``add_bos`` defaults to True for gemma3_text only).
    corpus_text(n_paragraphs=12, seed=0): deterministic English-like paragraphs joined by
        blank lines.
    text_corpus: fixture, a ``.txt`` file with ``corpus_text()`` (blank-line documents).
    corpus_files: fixture, a dict of the same documents as ``txt``, ``jsonl``, ``json``,
        ``parquet`` files and a ``folder`` holding two ``.txt`` files.
    choice_rows(n=10, seed=0): rows ``{context, choices (4, of 1-5 words), label}`` of a
        multiple-choice task, in corpus-like words.
    write_choice_task(folder, rows, name="tiny_choice"): a local lm-eval task in ``folder``
        (``<name>.jsonl`` and ``<name>.yaml``: ``dataset_path: json``, ``multiple_choice``,
        ``acc`` and ``acc_norm``, the datasets cache inside ``folder``); returns ``folder``.
    offline_hub: fixture, no Hugging Face Hub (offline flags of datasets and huggingface_hub).

``MINICOMPRESS_PROGRESS=0`` (no progress bars) and ``MINICOMPRESS_MALLOC=default`` (recover leaves
glibc's allocator as it is) are set for the whole session, and
``MINICOMPRESS_TOKEN_CACHE`` points at a fresh temporary folder (token stores).
``autocast: auto`` resolves to float32 in every test (an autouse fixture tells
:mod:`minicompress.hardware` the CPU has no native bf16), so numbers do not depend on the
machine; tests of the bf16 path ask for it explicitly or patch the probe themselves.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest
import torch

os.environ["MINICOMPRESS_PROGRESS"] = "0"
# recover keeps freed heap blocks mapped for the rest of its process (hardware.keep_freed_memory):
# in one pytest process that would change what the memory-measurement tests see after any
# recovery test; tests/test_hardware.py checks the setting in subprocesses of its own
os.environ["MINICOMPRESS_MALLOC"] = "default"
# token stores of the tests' corpora go to a fresh folder, never the user's cache
import tempfile as _tempfile  # noqa: E402

os.environ["MINICOMPRESS_TOKEN_CACHE"] = _tempfile.mkdtemp(prefix="minicompress-test-tokens-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TINY_VOCAB = 256
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]  # ids 0, 1, 2, 3
UNK_ID, PAD_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_ONSETS = ["b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng"]
_FUNCTION_WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "it"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))


def corpus_text(n_paragraphs: int = 12, seed: int = 0) -> str:
    """Deterministic English-like paragraphs separated by blank lines.

    Args:
        n_paragraphs: number of paragraphs (documents).
        seed: seed of the generator.

    Returns:
        The text, paragraphs joined by ``"\\n\\n"``.
    """
    rng = random.Random(seed)
    lexicon = [_word(random.Random(1000 + i)) for i in range(60)]
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 6)):
            words = [rng.choice(_FUNCTION_WORDS) if rng.random() < 0.4 else rng.choice(lexicon)
                     for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ",", "?"]))
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


_TOKENIZER_CACHE: dict[bool, object] = {}


def make_tiny_tokenizer(add_bos: bool = False):
    """A BPE ``PreTrainedTokenizerFast`` trained on :func:`corpus_text`, vocab < 256.

    Args:
        add_bos: prepend ``<s>`` (id 2) when ``add_special_tokens=True`` (Gemma-style).

    Returns:
        A fresh tokenizer (training is cached; the returned object is a new copy).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if add_bos not in _TOKENIZER_CACHE:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder()
        trainer = trainers.BpeTrainer(vocab_size=220, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator([corpus_text(40, seed=s) for s in range(3)], trainer)
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", BOS_ID)])
        _TOKENIZER_CACHE[add_bos] = tok.to_str()
    from tokenizers import Tokenizer as _T

    return PreTrainedTokenizerFast(tokenizer_object=_T.from_str(_TOKENIZER_CACHE[add_bos]), unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(model_type: str, **overrides):
    """The transformers config of a tiny random model of ``model_type``.

    Args:
        model_type: one of :data:`TINY_MODEL_TYPES`.
        **overrides: config keys to replace.

    Returns:
        A ``PretrainedConfig``.
    """
    from transformers import AutoConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    per_type = {
        "llama": dict(tie_word_embeddings=True),
        "mistral": dict(tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(tie_word_embeddings=False, head_dim=16),
        "gemma3_text": dict(tie_word_embeddings=True, head_dim=16, num_hidden_layers=3, sliding_window=8,
                            query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    }
    if model_type not in per_type:
        raise ValueError(f"no tiny config for {model_type!r}; choose one of {TINY_MODEL_TYPES}")
    kwargs = {**common, **per_type[model_type], **overrides}
    if "num_hidden_layers" in overrides and model_type == "gemma3_text" and "layer_types" not in overrides:
        n = overrides["num_hidden_layers"]
        kwargs["layer_types"] = ["full_attention" if i % 2 else "sliding_attention" for i in range(n)]
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_model(model_type: str, seed: int = 0, **overrides):
    """A seeded, float32, eval-mode tiny ``*ForCausalLM`` (global RNG state is preserved).

    Args:
        model_type: one of :data:`TINY_MODEL_TYPES`.
        seed: seed of the random init.
        **overrides: config keys to replace.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.float().eval()


@pytest.fixture(autouse=True)
def _float32_auto_precision(monkeypatch):
    """``autocast: auto`` means float32 in tests, whatever this CPU can do."""
    from minicompress import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)


@pytest.fixture(name="make_tiny_model")
def _make_tiny_model_fixture():
    """The :func:`make_tiny_model` factory."""
    return make_tiny_model


@pytest.fixture
def tiny_tokenizer():
    """A tiny BPE tokenizer that adds no BOS (like SmolLM2's)."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_bos_tokenizer():
    """A tiny BPE tokenizer that prepends BOS (like Gemma's)."""
    return make_tiny_tokenizer(add_bos=True)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory ``(model_type, add_bos=None, seed=0, **overrides) -> Path`` of a saved tiny model folder."""
    counter = {"n": 0}

    def factory(model_type: str, add_bos: bool | None = None, seed: int = 0, **overrides) -> Path:
        counter["n"] += 1
        folder = tmp_path / f"{model_type}-{counter['n']}"
        model = make_tiny_model(model_type, seed=seed, **overrides)
        model.save_pretrained(folder)
        make_tiny_tokenizer(add_bos=model_type == "gemma3_text" if add_bos is None else add_bos).save_pretrained(folder)
        return folder

    return factory


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A ``.txt`` file of English-like paragraphs separated by blank lines."""
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text() + "\n")
    return path


@pytest.fixture
def corpus_files(tmp_path) -> dict[str, Path]:
    """The same documents as ``txt``, ``jsonl``, ``json``, ``parquet`` and a ``folder`` of two txt files."""
    docs = corpus_text(6).split("\n\n")
    root = tmp_path / "corpus_files"
    root.mkdir()
    out = {"docs": docs}
    out["txt"] = root / "docs.txt"
    out["txt"].write_text("\n\n".join(docs))
    out["jsonl"] = root / "docs.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out["json"] = root / "docs.json"
    out["json"].write_text(json.dumps([{"text": d} for d in docs]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    out["parquet"] = root / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), out["parquet"])
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(docs[:3]))
    (folder / "b.txt").write_text("\n\n".join(docs[3:]))
    out["folder"] = folder
    return out


_CHOICE_WORDS = ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "it"]


def choice_rows(n: int = 10, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice rows ``{context, choices (4, of 1-5 words), label}``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        context = " ".join(rng.choice(_CHOICE_WORDS) for _ in range(rng.randint(4, 8))).capitalize()
        choices = [" ".join(rng.choice(_CHOICE_WORDS) for _ in range(k)) for k in rng.sample(range(1, 6), 4)]
        rows.append({"context": context, "choices": choices, "label": rng.randrange(4)})
    return rows


def write_choice_task(folder: Path, rows: list[dict], name: str = "tiny_choice") -> Path:
    """A local lm-eval multiple-choice task (``<name>.jsonl`` + ``<name>.yaml``) in ``folder``."""
    from minicompress.evaluation.tasks import choice_task_yaml

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(choice_task_yaml(name, data, folder / 'hf-cache'))
    return folder


@pytest.fixture
def offline_hub(monkeypatch):
    """No Hugging Face Hub: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` in the environment and
    in the flags datasets and huggingface_hub read when imported."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


_DEFAULT_THREADS = torch.get_num_threads()


def pytest_runtest_setup(item):
    """Tiny models run single-threaded: OpenMP threads only add overhead (and stall badly
    when other processes share the 2 cores); ``slow`` real-model tests get every core."""
    torch.set_num_threads(_DEFAULT_THREADS if "slow" in item.keywords else 1)


@pytest.fixture(autouse=True)
def _capture_minicompress_logs(monkeypatch):
    """The CLI's logging setup (run by earlier tests) stops ``minicompress`` records from
    propagating to the root logger, where caplog listens: let them through for every test."""
    monkeypatch.setattr(logging.getLogger("minicompress"), "propagate", True)
