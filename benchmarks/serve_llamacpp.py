"""Served in llama.cpp: minicompress's output folders through llama.cpp's own tools.

A model minicompress writes is a stock Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files), so llama.cpp serves it with nothing of ours in
between. For each ``--models`` folder this script

1. builds llama.cpp once (``llama-perplexity``, ``llama-bench``, ``llama-quantize``,
   ``llama-tokenize``, ``llama-completion``; ``-DGGML_NATIVE=ON``) from the source vendored in
   the ``llama-cpp-python`` sdist (``pip download --no-binary :all: llama-cpp-python==0.3.36``),
   cached under ``~/.cache/minicompress/llamacpp/<version>/`` (``$MINICOMPRESS_CACHE``);
   the converter's one missing dependency, ``sentencepiece``, goes into a venv there
   (``--system-site-packages``: torch and transformers are ours, our environment is untouched);
2. converts the folder with llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` (float32:
   the built-in teacher's weights are dequantized Q4_1 values, which bf16/f16 would round) and
   quantizes that file with ``llama-quantize`` to BF16, Q8_0 and Q4_K_M (cached per folder
   contents under ``<cache>/gguf/``; a second run converts nothing);
3. measures, for every file, ``llama-perplexity`` on the same windows as ``minicompress eval``
   and ``llama-bench`` prefill/decode tokens/s (``-p 512 -n 128``, ``--threads``), and the size;
4. computes ``minicompress eval``'s perplexity of the same folder in float32 (autocast
   none) in this process, twice: on its own windows (non-overlapping ``--seq-len`` windows of
   the first ``--max-tokens`` tokens, every target scored) and on exactly llama.cpp's windows.

Matching the windows. ``llama-perplexity`` by default scores only the second half of each
context. Its strided mode (``--ppl-stride S``, context ``-c`` + S/2) scores the last S targets
of windows that start every S tokens; with ``S = seq_len - 1`` and ``-c = -b = seq_len -
(seq_len - 1) // 2`` the context is ``seq_len`` and every target after the first token of
the text is scored once, with 0..seq_len-1 tokens of context: ``minicompress eval --stride
seq_len-1``'s windows (the ragged tail dropped). Those windows start every 511 tokens instead
of every 512, so ``minicompress eval``'s own number differs from them by a fraction of a
percent; both are printed with their ratios to llama.cpp's float32 number (target: 1.000). The
text llama.cpp reads is the one minicompress tokenises (the ``.txt`` read as one document,
its first ``max_tokens * 16`` characters); ``llama-tokenize`` checks that both tokenizers
give the same ids. Models whose tokenizer prepends BOS (Gemma) cannot be matched this way
(llama.cpp's strided mode feeds no BOS); they are flagged.

Q4_K_M on SmolLM2: K-quants need rows of 256 values; SmolLM2's 576-wide projections are
not, so ``llama-quantize`` falls back to Q5_0/Q8_0 for those tensors (its log says so), which
is why the Q4_K_M file is larger than 4.5 bits per weight would suggest.

Usage::

    python benchmarks/serve_llamacpp.py                    # teacher + pruned 50% student
    python benchmarks/serve_llamacpp.py --models smollm2-135m \\
        ~/.cache/minicompress/runs/students/smollm2-50-searched ~/.cache/minicompress/runs/<recovered>
    python benchmarks/serve_llamacpp.py --max-tokens 2048 --bench-reps 1   # quick check

The first run downloads the sdist (75 MB; pip prepares its metadata, ~2 minutes) and builds
llama.cpp (about 10 minutes on 2 idle cores, 28 niced behind a busy job); then about 5-8 minutes
per model on 2 idle cores (the float32 torch evaluations and ``llama-bench -r 5`` of four
files take most of it; ``--max-tokens 2048 --bench-reps 1`` ran two models in 5 minutes on
shared cores). The first model is the reference of the speed-up columns. Writes
``benchmarks/out/serve_llamacpp.json`` and prints rich tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import DATA, OUT, MiB, load_average, make_console, run_record, table, write_json

#: the llama-cpp-python release whose vendored llama.cpp is built
VERSION = "0.3.36"
#: the llama.cpp tools built (llama-completion is the one-shot generator, formerly llama-cli)
TARGETS = ("llama-perplexity", "llama-bench", "llama-quantize", "llama-tokenize", "llama-completion")
#: llama-quantize types made from the float32 GGUF
QUANT_TYPES = ("bf16", "q8_0", "q4_k_m")
WIKITEXT = DATA / "wikitext2" / "test.txt"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF")


class ServeError(RuntimeError):
    """A step failed; the message is one line naming the flag or the tool and its log."""


# --------------------------------------------------------------------------- pure helpers


def strided_flags(seq_len: int) -> dict[str, int]:
    """``llama-perplexity`` flags whose strided mode scores ``minicompress eval``'s targets.

    The strided mode runs contexts of ``c + stride // 2`` tokens starting every ``stride``
    tokens and scores their last ``stride`` targets; ``-b`` equal to ``-c`` keeps one
    sequence per context.

    Args:
        seq_len: the window length (>= 3).

    Returns:
        ``{"ctx_size", "batch_size", "ppl_stride"}`` with ``ctx_size + ppl_stride // 2 == seq_len``.
    """
    if seq_len < 3:
        raise ServeError(f"--seq-len: must be at least 3, got {seq_len}")
    stride = seq_len - 1
    ctx = seq_len - stride // 2
    return {"ctx_size": ctx, "batch_size": ctx, "ppl_stride": stride}


def strided_window_count(num_tokens: int, seq_len: int) -> int:
    """Full windows of ``seq_len`` tokens starting every ``seq_len - 1`` tokens of a stream."""
    return 0 if num_tokens < seq_len else (num_tokens - seq_len) // (seq_len - 1) + 1


_PPL_RUNNING = re.compile(r"\[(\d+)\](nan|inf|-?\d+(?:\.\d+)?),")
_PPL_CHUNKS = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
_PPL_FINAL = re.compile(r"Final estimate: PPL = (\S+) \+/- (\S+)")


def parse_perplexity_log(text: str) -> dict:
    """Read ``llama-perplexity``'s output (default ``--ppl-output-type 0``).

    The strided mode prints the running perplexity after every chunk (``[1]135.2,[2]...``)
    and no final line; the default mode ends with ``Final estimate: PPL = x +/- e``.

    Returns:
        ``{"perplexity", "chunks", "n_ctx"}`` (``chunks``/``n_ctx`` from the
        ``computing over N chunks, n_ctx=C`` line, None when absent) plus ``"stderr"`` for
        the final-estimate form.

    Raises:
        ServeError: no perplexity in the text.
    """
    out: dict = {"chunks": None, "n_ctx": None}
    if m := _PPL_CHUNKS.search(text):
        out["chunks"], out["n_ctx"] = int(m.group(1)), int(m.group(2))
    if m := _PPL_FINAL.search(text):
        out.update(perplexity=float(m.group(1)), stderr=float(m.group(2)))
        return out
    running = _PPL_RUNNING.findall(text)
    if not running:
        raise ServeError("llama-perplexity: no perplexity in its output")
    out["perplexity"] = float(running[-1][1])
    out["chunks_done"] = int(running[-1][0])
    return out


def parse_bench_json(text: str) -> dict[str, dict]:
    """Read ``llama-bench -o json``: ``{"prefill"|"decode": {"tokens", "tokens_per_s", "stddev", "reps"}}``.

    Raises:
        ServeError: not JSON, or neither a prompt-only nor a generation-only test in it.
    """
    try:
        start = text.index("[")
        rows = json.loads(text[start:text.rindex("]") + 1])
    except ValueError:
        raise ServeError("llama-bench: no JSON array in its output") from None
    out = {}
    for row in rows:
        kind = "prefill" if row.get("n_gen", 0) == 0 else "decode" if row.get("n_prompt", 0) == 0 else None
        if kind:
            out[kind] = {"tokens": row["n_prompt"] or row["n_gen"], "tokens_per_s": float(row["avg_ts"]),
                         "stddev": float(row.get("stddev_ts", 0.0)), "reps": len(row.get("samples_ts", []))}
    if not out:
        raise ServeError("llama-bench: no prefill or decode test in its JSON")
    return out


def parse_token_ids(text: str) -> list[int]:
    """Read ``llama-tokenize --ids``: the last ``[id, id, ...]`` line of its output."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            return [int(x) for x in line[1:-1].split(",") if x.strip()]
    raise ServeError("llama-tokenize: no [ids] line in its output")


def folder_key(folder: Path) -> str:
    """12 hex digits naming a model folder's contents (path, sizes and mtimes of its files)."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".model") or path.name.startswith("tokenizer")):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- steps


def run_tool(cmd: list, log: Path | None = None, *, stdout_only: bool = False, timeout: float | None = None) -> str:
    """Run a command (no stdin); write its stdout+stderr to ``log``.

    Returns:
        stdout+stderr, or stdout alone with ``stdout_only``.

    Raises:
        ServeError: a non-zero exit, with the last lines of the output.
    """
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, errors="replace")
    text = result.stdout + result.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
    if result.returncode != 0:
        tail = " | ".join(text.strip().splitlines()[-5:])
        where = f" (log: {log})" if log else ""
        raise ServeError(f"{Path(str(cmd[0])).name} exited {result.returncode}{where}: {tail}")
    return result.stdout if stdout_only else text


def fetch_source(home: Path, version: str, console) -> Path:
    """``home/src``: llama.cpp as vendored in the ``llama-cpp-python`` sdist (downloaded once)."""
    src = home / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        console.log(f"downloading the llama-cpp-python {version} sdist (75 MB; pip prepares its metadata: ~2 min)")
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={version}", "-d", tmp], home / "download.log")
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        out = Path(tmp) / "src"
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.name != prefix + ".git":
                    member.name = member.name[len(prefix):]
                    members.append(member)
            tar.extractall(out, members=members, filter="data")
            try:  # the vendored submodule's commit, recorded with the results
                head = tar.extractfile(f"{sdist.name[:-len('.tar.gz')]}/.git/modules/vendor/llama.cpp/HEAD")
                (out / "LLAMA_CPP_COMMIT").write_text(head.read().decode().strip() + "\n")
            except (KeyError, AttributeError):
                pass
        if not (out / "convert_hf_to_gguf.py").is_file():
            raise ServeError(f"llama-cpp-python {version}: its sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(out, src)
    return src


def build_tools(home: Path, src: Path, jobs: int, console) -> Path:
    """Configure (once) and build :data:`TARGETS` in ``home/build``; return its ``bin`` folder."""
    build = home / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS) and (home / "build.done").is_file():
        return bin_dir
    if not (build / "CMakeCache.txt").is_file():
        run_tool(["cmake", "-S", src, "-B", build, *CMAKE_FLAGS], home / "configure.log")
    console.log(f"building {', '.join(TARGETS)} with -j{jobs} (log: {home / 'build.log'}; ~10 min on 2 idle cores)")
    started = time.perf_counter()
    run_tool(["cmake", "--build", build, "-j", str(jobs), "--target", *TARGETS], home / "build.log")
    missing = [t for t in TARGETS if not (bin_dir / t).is_file()]
    if missing:
        raise ServeError(f"llama.cpp build: {', '.join(missing)} missing after the build (log: {home / 'build.log'})")
    (home / "build.done").write_text(f"{time.perf_counter() - started:.0f} s\n")
    return bin_dir


def converter_python(home: Path, console) -> str:
    """A Python that runs ``convert_hf_to_gguf.py``: ours if it has ``sentencepiece``, else a venv
    in ``home/venv`` that sees our packages (``--system-site-packages``) and adds only that."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        return sys.executable
    venv = home / "venv"
    python = venv / "bin" / "python"
    if not (venv / "ready").is_file():
        console.log(f"installing sentencepiece (needed by convert_hf_to_gguf.py) into {venv}")
        run_tool([sys.executable, "-m", "venv", "--system-site-packages", "--clear", venv], home / "venv.log")
        run_tool([python, "-m", "pip", "install", "--quiet", "sentencepiece"], home / "venv.log")
        (venv / "ready").write_text("sentencepiece\n")
    return str(python)


def convert_and_quantize(folder: Path, name: str, home: Path, src: Path, bin_dir: Path, python: str,
                         types: tuple[str, ...], threads: int, console) -> dict[str, Path]:
    """``{"f32": path, "bf16": ..., ...}``: the GGUF files of one folder (made once, cached)."""
    out = home / "gguf" / f"{name}-{folder_key(folder)}"
    out.mkdir(parents=True, exist_ok=True)
    files = {"f32": out / "model-f32.gguf"}
    if not files["f32"].is_file():
        console.log(f"{name}: convert_hf_to_gguf.py --outtype f32")
        tmp = out / ".model-f32.gguf.tmp"
        run_tool([python, src / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", tmp],
                 out / "convert.log")
        os.replace(tmp, files["f32"])
    for qtype in types:
        path = out / f"model-{qtype}.gguf"
        if not path.is_file():
            console.log(f"{name}: llama-quantize {qtype.upper()}")
            tmp = out / f".model-{qtype}.gguf.tmp"
            run_tool([bin_dir / "llama-quantize", files["f32"], tmp, qtype.upper(), threads],
                     out / f"quantize-{qtype}.log")
            os.replace(tmp, path)
        files[qtype] = path
    return files


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, seq_len: int, chunks: int, threads: int) -> dict:
    """``llama-perplexity`` in the strided mode of :func:`strided_flags` on ``chunks`` windows."""
    flags = strided_flags(seq_len)
    started = time.perf_counter()
    log = run_tool([bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", flags["ctx_size"],
                    "-b", flags["batch_size"], "--ppl-stride", flags["ppl_stride"], "--chunks", chunks,
                    "-t", threads, "--no-escape"], gguf.with_name(gguf.stem + ".perplexity.log"))
    out = parse_perplexity_log(log)
    out["seconds"] = time.perf_counter() - started
    if out["n_ctx"] != seq_len or out["chunks"] != chunks:
        raise ServeError(f"llama-perplexity: ran {out['chunks']} chunks of n_ctx={out['n_ctx']}, expected {chunks} "
                         f"of {seq_len} (log: {gguf.stem}.perplexity.log)")
    return out


def llama_bench(bin_dir: Path, gguf: Path, prompt: int, gen: int, threads: int, reps: int) -> dict:
    """``llama-bench -p prompt -n gen -t threads -r reps -o json``: prefill and decode tokens/s."""
    text = run_tool([bin_dir / "llama-bench", "-m", gguf, "-p", prompt, "-n", gen, "-t", threads, "-r", reps,
                     "-o", "json"], gguf.with_name(gguf.stem + ".bench.log"), stdout_only=True)
    return parse_bench_json(text)


def llama_tokens(bin_dir: Path, gguf: Path, text: Path) -> list[int]:
    """The ids ``llama-tokenize`` gives the text (no BOS)."""
    out = run_tool([bin_dir / "llama-tokenize", "-m", gguf, "-f", text, "--ids", "--no-bos", "--no-escape",
                    "--log-disable"], gguf.with_name("tokenize.log"), stdout_only=True)
    return parse_token_ids(out)


def llama_sample(bin_dir: Path, gguf: Path, prompt: str, tokens: int, threads: int) -> str:
    """A greedy continuation of ``prompt`` by ``llama-completion`` (no chat template)."""
    out = run_tool([bin_dir / "llama-completion", "-m", gguf, "-p", prompt, "-n", tokens, "--temp", "0",
                    "-t", threads, "-no-cnv", "--no-warmup"],
                   gguf.with_name(gguf.stem + ".sample.log"), stdout_only=True, timeout=300)
    return out.strip().removesuffix("[end of text]").strip()


def resolve_folder(spec: str) -> tuple[str, Path]:
    """``(name, folder)`` of a ``--models`` entry: a built-in name (its converted HF folder,
    :func:`minicompress.models.builtin_folder`) or an HF folder."""
    from minicompress.models import BUILTIN_MODELS, builtin_folder

    if spec in BUILTIN_MODELS:
        return spec, builtin_folder(spec)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ServeError(f"--models: {spec} is neither a built-in name ({', '.join(BUILTIN_MODELS)}) nor a folder "
                         f"with config.json")
    return folder.resolve().name, folder.resolve()


def minicompress_perplexity(source: str, data: str, seq_len: int, max_tokens: int, threads: int,
                            batch_size: int) -> dict:
    """``minicompress eval``'s float32 perplexity (own windows) and on llama.cpp's windows, plus
    the token stream both read."""
    import torch

    from minicompress.config import DataConfig, ModelConfig
    from minicompress.data.sources import bos_token_id, load_token_stream, read_documents
    from minicompress.evaluation.perplexity import eval_windows
    from minicompress.models import load_for_flag
    from minicompress.evaluation.perplexity import evaluate_model

    torch.set_num_threads(threads)
    model, tokenizer = load_for_flag(ModelConfig(source=source, dtype="float32"), "--models")
    config = DataConfig(source=data, seq_len=seq_len, max_tokens=max_tokens, shuffle=False, documents="file")
    stream = load_token_stream(config, tokenizer)
    bos = bos_token_id(tokenizer)
    own = evaluate_model(model, tokenizer, config, autocast="none", batch_size=batch_size)
    matched_windows = [(w, n) for w, n in eval_windows(stream, seq_len, seq_len - 1, None) if w.numel() == seq_len]
    matched = evaluate_model(model, data=matched_windows, autocast="none", batch_size=batch_size)
    docs = read_documents(data, "text", "file")
    return {"own": own, "matched": matched, "stream": stream.tolist(), "bos": bos,
            "text": docs[0][: max_tokens * 16], "windows": len(matched_windows)}


def minicompress_record(mc: dict) -> dict:
    """The JSON record of :func:`minicompress_perplexity`'s two evaluations."""
    own, matched = mc["own"], mc["matched"]
    return {"perplexity": own["perplexity"], "windows": own["windows"], "tokens": own["tokens"],
            "eval_tokens_per_s": own["eval_tokens_per_s"], "matched_perplexity": matched["perplexity"],
            "matched_windows": matched["windows"], "matched_tokens": matched["tokens"],
            "bos_prepended": mc["bos"] is not None, "parameters": own["parameters"]}


def compare_tokens(llama: list[int], ours: list[int], max_tokens: int) -> dict:
    """Whether llama.cpp's first ``max_tokens`` ids are minicompress's: ``{"same", "first_difference", "compared"}``."""
    llama = llama[:max_tokens]
    first = next((i for i, (a, b) in enumerate(zip(llama, ours)) if a != b), None)
    if first is None and len(llama) != min(max_tokens, len(ours)):
        first = min(len(llama), len(ours))
    return {"same": first is None, "first_difference": first, "compared": len(llama)}


def measure_file(bin_dir: Path, gguf: Path, text: Path, args, chunks: int) -> dict:
    """Size, llama.cpp perplexity and llama-bench speed of one GGUF file."""
    ppl = llama_perplexity(bin_dir, gguf, text, args.seq_len, chunks, args.threads)
    speed = llama_bench(bin_dir, gguf, args.prompt_tokens, args.gen_tokens, args.threads, args.bench_reps)
    log = gguf.with_name(f"quantize-{gguf.stem.removeprefix('model-')}.log")
    fallbacks = log.read_text(errors="replace").count("falling back to") if log.is_file() else 0
    return {"size_bytes": gguf.stat().st_size, "perplexity": ppl["perplexity"], "perplexity_seconds": ppl["seconds"],
            "chunks": ppl["chunks"], "n_ctx": ppl["n_ctx"], "quantize_fallback_tensors": fallbacks, **speed}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["smollm2-135m", "~/.cache/minicompress/runs/students/smollm2-50-searched"],
                        help="built-in names or HF folders; the first is the reference of the speed-up columns")
    parser.add_argument("--data", default=str(WIKITEXT), help="evaluation text (.txt, read as one document)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="first tokens of the text (default 16,384)")
    parser.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads (default 2)")
    parser.add_argument("--types", nargs="+", default=list(QUANT_TYPES), choices=QUANT_TYPES,
                        help="llama-quantize types made from the float32 GGUF (default: all)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="llama-bench -p (default 512)")
    parser.add_argument("--gen-tokens", type=int, default=128, help="llama-bench -n (default 128)")
    parser.add_argument("--bench-reps", type=int, default=5, help="llama-bench -r (default 5)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward of minicompress's eval")
    parser.add_argument("--sample-prompt", default="The capital of France is",
                        help="greedy 32-token continuation by llama-completion of each model's last type ('' skips)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the one-time build (default 2)")
    parser.add_argument("--version", default=VERSION, help=f"llama-cpp-python sdist to build (default {VERSION})")
    parser.add_argument("--no-torch", action="store_true", help="skip minicompress's own perplexity")
    parser.add_argument("--speed-only", action="store_true",
                        help="only re-run llama-bench on the GGUF files of an earlier --output JSON and update its "
                             "speed columns (e.g. on an idle machine); nothing is converted or scored")
    parser.add_argument("--output", default=str(OUT / "serve_llamacpp.json"))
    args = parser.parse_args(argv)
    console = make_console()
    try:
        return remeasure_speed(args, console) if args.speed_only else run(args, console)
    except ServeError as err:
        console.print(f"error: {err}", style="red")
        return 2


def run(args, console) -> int:
    """The benchmark proper (see the module docstring)."""
    from minicompress.errors import MinicompressError
    from minicompress.models import cache_dir

    os.environ.setdefault("MINICOMPRESS_PROGRESS", "0")
    if not Path(args.data).is_file():
        raise ServeError(f"--data: {args.data} is not a file")
    if args.max_tokens < 2 * args.seq_len:
        raise ServeError(f"--max-tokens: must be at least 2 * --seq-len = {2 * args.seq_len}, got {args.max_tokens}")
    strided_flags(args.seq_len)
    started = time.perf_counter()
    load_start = load_average()
    home = cache_dir() / "llamacpp" / args.version
    src = fetch_source(home, args.version, console)
    bin_dir = build_tools(home, src, args.jobs, console)
    python = converter_python(home, console)
    try:
        models = [resolve_folder(spec) for spec in args.models]
    except MinicompressError as err:
        raise ServeError(str(err)) from None
    types = ("f32", *args.types)
    chunks = strided_window_count(args.max_tokens, args.seq_len)
    records = []
    for name, folder in models:
        files = convert_and_quantize(folder, name, home, src, bin_dir, python, tuple(args.types), args.threads,
                                     console)
        record: dict = {"model": name, "folder": str(folder), "files": {t: str(p) for t, p in files.items()}}
        mc = None
        if not args.no_torch:
            console.log(f"{name}: minicompress eval (float32, autocast none) on its own and on llama.cpp's windows")
            try:
                mc = minicompress_perplexity(str(folder), args.data, args.seq_len, args.max_tokens, args.threads,
                                             args.batch_size)
            except MinicompressError as err:
                raise ServeError(str(err)) from None
            record["minicompress"] = minicompress_record(mc)
            if mc["bos"] is not None:
                console.log(f"[yellow]{name}: its tokenizer prepends BOS; llama.cpp's strided windows have none, "
                            "so the perplexities are not like for like")
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(tmp) / "eval.txt"
            if mc is None:
                from minicompress.data.sources import read_documents

                text.write_bytes(read_documents(args.data, "text", "file")[0][: args.max_tokens * 16].encode())
            else:
                text.write_bytes(mc["text"].encode())
                record["tokens_match"] = compare_tokens(llama_tokens(bin_dir, files["f32"], text), mc["stream"],
                                                        args.max_tokens)
                if not record["tokens_match"]["same"]:
                    console.log(f"[yellow]{name}: llama.cpp's tokens differ from minicompress's at "
                                f"{record['tokens_match']['first_difference']}")
            record["gguf"] = {}
            for qtype in types:
                console.log(f"{name} {qtype}: llama-perplexity ({chunks} windows) and llama-bench")
                record["gguf"][qtype] = measure_file(bin_dir, files[qtype], text, args, chunks)
        if args.sample_prompt:
            record["sample"] = {"type": types[-1], "prompt": args.sample_prompt,
                                "text": llama_sample(bin_dir, files[types[-1]], args.sample_prompt, 32, args.threads)}
        records.append(record)

    show(console, records, types, args, chunks)
    info = {"llama_cpp_python": args.version, "llama_cpp_commit": _commit(src), "cmake_flags": list(CMAKE_FLAGS),
            "data": args.data, "max_tokens": args.max_tokens, "seq_len": args.seq_len, "threads": args.threads,
            "llama_perplexity_flags": strided_flags(args.seq_len), "windows": chunks,
            "bench": {"prompt": args.prompt_tokens, "gen": args.gen_tokens, "reps": args.bench_reps},
            "loadavg_start": load_start, "loadavg_end": load_average(),
            "total_seconds": time.perf_counter() - started}
    out = write_json(args.output, run_record(benchmark="serve_llamacpp", **info, models=records))
    console.print(f"wrote {out} in {info['total_seconds']:.0f} s (load average {load_start} -> {info['loadavg_end']})")
    return 0


def remeasure_speed(args, console) -> int:
    """``--speed-only``: llama-bench again on every file of ``args.output``; the JSON is updated
    in place (the earlier speeds kept under ``speed_first_run``)."""
    from minicompress.models import cache_dir

    path = Path(args.output)
    if not path.is_file():
        raise ServeError(f"--speed-only: {path} does not exist; run the benchmark without --speed-only first")
    record = json.loads(path.read_text())
    bin_dir = cache_dir() / "llamacpp" / record["llama_cpp_python"] / "build" / "bin"
    if not (bin_dir / "llama-bench").is_file():
        raise ServeError(f"--speed-only: no llama-bench under {bin_dir}; run the benchmark without --speed-only")
    load_start = load_average()
    for model in record["models"]:
        for qtype, result in model["gguf"].items():
            gguf = Path(model["files"][qtype])
            if not gguf.is_file():
                raise ServeError(f"--speed-only: {gguf} is gone; run the benchmark without --speed-only")
            console.log(f"{model['model']} {qtype}: llama-bench")
            result.setdefault("speed_first_run", {k: result.get(k) for k in ("prefill", "decode")})
            result.update(llama_bench(bin_dir, gguf, args.prompt_tokens, args.gen_tokens, args.threads,
                                      args.bench_reps))
    record["bench"] = {"prompt": args.prompt_tokens, "gen": args.gen_tokens, "reps": args.bench_reps}
    record["speed_remeasured"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
                                  "loadavg_start": load_start, "loadavg_end": load_average()}
    types = tuple(record["models"][0]["gguf"])
    show(console, record["models"], types, args, record["windows"])
    write_json(path, record)
    console.print(f"updated the speed columns of {path} (load average {load_start} -> {load_average()})")
    return 0


def _commit(src: Path) -> str | None:
    path = src / "LLAMA_CPP_COMMIT"
    return path.read_text().strip() if path.is_file() else None


def show(console, records: list[dict], types: tuple[str, ...], args, chunks: int) -> None:
    """Print the perplexity check and the serving table."""
    checks = [r for r in records if "minicompress" in r]
    if checks:
        console.print(table(
            f"llama.cpp vs minicompress eval: float32 perplexity, first {args.max_tokens:,} tokens, seq {args.seq_len}",
            ("model", "minicompress eval", "minicompress, llama.cpp's windows", "llama.cpp f32", "llama / mc windows",
             "llama / mc eval", "same tokens"),
            [(r["model"], f"{r['minicompress']['perplexity']:.3f}", f"{r['minicompress']['matched_perplexity']:.3f}",
              f"{r['gguf']['f32']['perplexity']:.3f}",
              f"{r['gguf']['f32']['perplexity'] / r['minicompress']['matched_perplexity']:.4f}",
              f"{r['gguf']['f32']['perplexity'] / r['minicompress']['perplexity']:.4f}",
              r.get("tokens_match", {}).get("same")) for r in checks]))
    ref = records[0]["gguf"]
    rows = []
    for r in records:
        for qtype in types:
            g = r["gguf"][qtype]
            f32 = r["gguf"]["f32"]["perplexity"]
            pre, dec = (g.get(k, {}).get("tokens_per_s") for k in ("prefill", "decode"))
            ref_pre, ref_dec = (ref[qtype].get(k, {}).get("tokens_per_s") for k in ("prefill", "decode"))
            rows.append((r["model"], qtype.upper(), f"{g['size_bytes'] / MiB:.1f}", f"{g['perplexity']:.3f}",
                         f"{100 * (g['perplexity'] / f32 - 1):+.2f}%",
                         "" if pre is None else f"{pre:.1f}", "" if dec is None else f"{dec:.1f}",
                         "" if not (pre and ref_pre) else f"{pre / ref_pre:.2f}x",
                         "" if not (dec and ref_dec) else f"{dec / ref_dec:.2f}x"))
    console.print(table(
        f"Served in llama.cpp (llama-cpp-python {args.version}'s llama.cpp, {args.threads} threads; ppl on {chunks} "
        f"windows of {args.seq_len}; llama-bench -p {args.prompt_tokens} -n {args.gen_tokens} -r {args.bench_reps})",
        ("model", "type", "MiB", "ppl", "vs f32", "prefill tok/s", "decode tok/s",
         f"prefill vs {records[0]['model']}", f"decode vs {records[0]['model']}"),
        rows, left=2))
    for r in records:
        if "sample" in r:
            console.print(f"[bold]{r['model']}[/] ({r['sample']['type'].upper()}): {r['sample']['text']!r}")


if __name__ == "__main__":
    raise SystemExit(main())
