"""The ``minicompress`` command line: one registry of subcommands and shared flag helpers.

Every subcommand is one function registered with :func:`subcommand`; its ``setup``
callable adds flags with the shared helpers (:func:`add_common`, :func:`add_model_flags`,
:func:`add_data_flags`, :func:`config_flag`). Flags that set a config key store under a
``cfg:<dotted.key>`` destination, so :func:`flags_to_overrides` can turn whatever the user
typed into the nested override dict of :func:`~minicompress.config.build_config`.

Priority, lowest to highest: the dataclass defaults, ``--config file.yaml``, convenience
flags (``--seq-len 512``), explicit ``key.sub=value`` overrides (trailing, or ``--set``).

A subcommand returns an exit status; :func:`run_command` turns a
:class:`~minicompress.errors.MinicompressError` into ``error: <message>`` on stderr and
exit status 2. Tables are printed with :func:`render_table`, results written as JSON with
:func:`write_result` (atomically, never over an existing file without ``--overwrite``).

Adding a subcommand::

    def _prune_setup(p):
        add_common(p)
        add_model_flags(p, "model")
        add_data_flags(p)
        config_flag(p, "--target-params", key="target.target_params", help="...")

    @subcommand("prune", help="prune a model", setup=_prune_setup)
    def prune_command(args):
        cfg = build_from_args(PruneConfig, args)
        check_output(cfg.output, cfg.overwrite)
        ...
        render_table("prune", result)
        return 0
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import AUTOCAST, DRAFT_TOKENS
from .errors import ConfigError, MinicompressError

log = logging.getLogger("minicompress")

CFG_PREFIX = "cfg:"
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")
AUTOCAST_HELP = ("auto (default): bf16 autocast where the hardware has native bf16 (CUDA, AVX512-BF16/AMX CPUs), "
                 "float32 elsewhere; none/bfloat16 force it")


# ----------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand.

    Attributes:
        name: the word after ``minicompress``.
        help: one line shown by ``minicompress --help``.
        setup: adds the subcommand's flags to its parser.
        run: takes the parsed namespace, returns an exit status.
    """

    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, *, help: str, setup: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``fn(args) -> int`` as ``minicompress <name>``.

    Args:
        name: the subcommand word.
        help: one-line description.
        setup: ``setup(parser)`` adds the flags.
    """

    def register(fn: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, setup, fn)
        return fn

    return register


class _UsageError(Exception):
    """An argparse usage error, reported as one line like a MinicompressError."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------------------
# Shared flag helpers


def config_flag(parser: argparse.ArgumentParser, *flags: str, key: str, **kwargs: Any) -> argparse.Action:
    """Add a flag that sets the config key ``key`` (dotted) when given.

    The value is kept as typed (a string unless ``action`` says otherwise); the config
    coerces and validates it, so ``--max-tokens 16k`` works and a bad value is reported
    as ``--flag (key): ...``.

    Args:
        parser: the subcommand parser.
        *flags: option strings, e.g. ``"--seq-len"``.
        key: dotted config key, e.g. ``"data.seq_len"``.
        **kwargs: passed to ``add_argument`` (``help``, ``action``, ``choices``, ``const``...).
    """
    kwargs.setdefault("default", argparse.SUPPRESS)
    if kwargs.get("action") not in ("store_true", "store_false", "store_const") and "choices" not in kwargs:
        kwargs.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    return parser.add_argument(*flags, dest=CFG_PREFIX + key, **kwargs)


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` (debug logs) and ``-q/--quiet`` (warnings only, no progress bars)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true",
                       help="show debug log messages, and transformers' own progress bars and warnings")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")


def add_common(parser: argparse.ArgumentParser, output_help: str = "write results as JSON to this file") -> None:
    """``--config``, ``--set key=value``, ``--output``, ``--overwrite`` and the logging flags.

    Trailing ``key.sub=value`` words are overrides too (they need no flag).
    """
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flags win over it)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.seq_len=512 (also accepted as trailing KEY=VALUE)")
    config_flag(parser, "--output", "-o", key="output", metavar="PATH", help=output_help)
    config_flag(parser, "--overwrite", key="overwrite", action="store_const", const=True,
                help="replace an existing output")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 helps when other jobs share the cores)")
    add_logging_flags(parser)


def add_model_flags(parser: argparse.ArgumentParser, prefix: str = "model", key: str | None = None,
                    default_help: str = "") -> None:
    """Model source flags: ``--<prefix>``, and dtype/device/trust-remote-code.

    For ``prefix="model"`` the flags are ``--model --dtype --device --trust-remote-code``;
    for any other prefix (``teacher``) they are ``--teacher --teacher-dtype
    --teacher-device --teacher-trust-remote-code``.

    Args:
        parser: the subcommand parser.
        prefix: ``model`` or e.g. ``teacher``.
        key: the config section (default: ``prefix``; ``student`` for recovery).
        default_help: appended to the source flag's help.
    """
    from .config import DEVICES, DTYPES

    key = key or prefix
    dash = "" if prefix == "model" else f"{prefix}-"
    what = "model" if prefix == "model" else prefix
    config_flag(parser, f"--{prefix}", key=f"{key}.source", metavar="SOURCE",
                help=f"{what}: HF folder, .gguf file, Hub id or built-in (smollm2-135m, gemma3-270m){default_help}")
    config_flag(parser, f"--{dash}dtype", key=f"{key}.dtype", choices=DTYPES, help=f"{what} weight dtype")
    config_flag(parser, f"--{dash}device", key=f"{key}.device", choices=DEVICES, help=f"{what} device")
    config_flag(parser, f"--{dash}trust-remote-code", key=f"{key}.trust_remote_code", action="store_const",
                const=True, help=f"allow custom code from the {what} repository (off by default)")


def add_data_flags(parser: argparse.ArgumentParser, key: str = "data") -> None:
    """``--data --text-field --seq-len --max-tokens --seed --documents`` onto config section ``key``."""
    from .config import DOCUMENT_MODES

    config_flag(parser, "--data", key=f"{key}.source", metavar="SOURCE",
                help=".txt/.jsonl/.json/.parquet file, a folder of them, or a Hub dataset name[:config][@split]")
    config_flag(parser, "--data-mix", key=f"{key}.mixture", metavar="SOURCE=WEIGHT,...",
                help="several sources drawn by weight each step, e.g. corpus/=0.7,generated/text.jsonl=0.3 "
                     "(instead of --data)")
    config_flag(parser, "--no-token-store", key=f"{key}.token_store", action="store_const", const=False,
                help="tokenise in memory every run instead of the memory-mapped token store")
    config_flag(parser, "--text-field", key=f"{key}.text_field", help="field holding the text (default: text)")
    config_flag(parser, "--seq-len", key=f"{key}.seq_len", help="tokens per sequence / window")
    config_flag(parser, "--max-tokens", key=f"{key}.max_tokens", help="read at most this many tokens (e.g. 16k)")
    config_flag(parser, "--seed", key=f"{key}.seed", help="seed of the data shuffle")
    config_flag(parser, "--documents", key=f"{key}.documents", choices=DOCUMENT_MODES,
                help="split: blank-line separated documents in .txt; file: one document per file")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def flags_to_overrides(args: argparse.Namespace) -> dict:
    """The nested override dict of the given flags, with ``key=value`` overrides on top.

    Only flags the user actually typed appear (their default is ``SUPPRESS``).

    Raises:
        ConfigError: a malformed ``key=value`` override.
    """
    from .config import parse_overrides

    tree: dict = {}
    for dest, value in sorted(vars(args).items()):
        if dest.startswith(CFG_PREFIX):
            _set_dotted(tree, dest[len(CFG_PREFIX):], value)
    return _deep_merge(tree, parse_overrides(getattr(args, "overrides", None) or []))


def _flag_names(args: argparse.Namespace) -> dict[str, str]:
    return getattr(args, "_flag_names", {})


def build_from_args(cls: type, args: argparse.Namespace, *, output_needed_for: str | None = None):
    """Build config ``cls`` from ``--config``, the given flags and ``key=value`` overrides.

    A :class:`ConfigError` about a key that came from a flag names the flag too
    (``--seq-len (data.seq_len): ...``). With ``output_needed_for`` (e.g. "prune needs a
    folder for the pruned model") a config without ``output`` is refused with that text.
    """
    from .config import build_config

    try:
        cfg = build_config(cls, getattr(args, "config", None), flags_to_overrides(args))
    except ConfigError as err:
        key, sep, rest = str(err).partition(":")
        flag = _flag_names(args).get(key)
        typed = CFG_PREFIX + key in vars(args)
        overridden = any(o.startswith(key + "=") for o in getattr(args, "overrides", None) or [])
        if flag and sep and typed and not overridden:
            raise ConfigError(f"{flag} ({key}):{rest}") from None
        raise
    if output_needed_for is not None and cfg.output is None:
        raise ConfigError(f"--output: {output_needed_for}")
    return cfg


def name_flag(err: MinicompressError, args: argparse.Namespace) -> MinicompressError:
    """``key: message`` from the library as ``--flag (key): message`` when the user typed that flag.

    Commands check values against the model (``target.intermediate_size`` larger than
    the model's FFN) after the config is built; this names the flag in those errors too.
    """
    key, sep, rest = str(err).partition(":")
    flag = _flag_names(args).get(key)
    if flag and sep and CFG_PREFIX + key in vars(args):
        return type(err)(f"{flag} ({key}):{rest}")
    return err


# ----------------------------------------------------------------------------------------
# Output helpers


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False, width=max(100, _terminal_width()))


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def format_value(value: Any) -> str:
    """Human formatting for table cells: thousands separators, 4 significant digits."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        if abs(value) >= 1e-3:
            return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
        return f"{value:.3e}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def render_table(title: str, rows: dict | list[dict], *, columns: list[str] | None = None,
                 console=None) -> None:
    """Print a rich table to stdout.

    Args:
        title: table title.
        rows: a dict (printed as two columns, key and value) or a list of dicts
            (one row each; columns are the union of their keys, in first-seen order).
        columns: column order for a list of dicts (default: first-seen order).
        console: a ``rich.console.Console`` (default: stdout).
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    if isinstance(rows, dict):
        table.add_column("key", style="bold")
        table.add_column("value", justify="right")
        for key, value in rows.items():
            table.add_row(str(key), format_value(value))
    else:
        if columns is None:
            columns = []
            for row in rows:
                columns.extend(k for k in row if k not in columns)
        for i, col in enumerate(columns):
            table.add_column(str(col), justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
        for row in rows:
            table.add_row(*(format_value(row.get(c, "")) for c in columns))
    (console or _console()).print(table)


def write_result(path: str | Path | None, record: dict) -> Path | None:
    """Write ``record`` as JSON to ``path`` atomically (no-op for None).

    Call :func:`~minicompress.outputs.check_output` before doing the work; this only writes.
    """
    from .outputs import write_json_atomic

    if path is None:
        return None
    out = write_json_atomic(Path(path).expanduser(), record)
    log.info("wrote %s", out)
    return out


class _StderrHandler(logging.StreamHandler):
    """A plain stream handler that writes to whatever ``sys.stderr`` is at the time."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Show ``minicompress`` log messages on stderr.

    On a terminal through a rich handler; off a terminal (``2> file``, ``nohup``, CI) as
    plain one-line records, ``<time> <LEVEL> <message>``, never wrapped, so that a log
    file holds one line per message, the progress lines of
    :mod:`minicompress.progress` included. Default level INFO; ``verbose`` DEBUG;
    ``quiet`` WARNING.
    """
    from .progress import on_terminal

    logger = logging.getLogger("minicompress")
    for handler in list(logger.handlers):
        if getattr(handler, "_minicompress", False):
            logger.removeHandler(handler)
    if on_terminal():
        from rich.logging import RichHandler

        handler = RichHandler(console=_console(stderr=True), show_path=False, show_time=False, markup=False,
                              rich_tracebacks=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._minicompress = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def run_command(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand; a :class:`MinicompressError` becomes ``error: <msg>`` on stderr, exit 2."""
    try:
        return int(fn(args) or 0)
    except MinicompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------
# Model loading with the flag named in errors


# ----------------------------------------------------------------------------------------
# info


def _info_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="HF folder, .gguf file, Hub id or built-in name (default: smollm2-135m)")
    p.add_argument("--json", "--output", "-o", dest="output", metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file")
    p.add_argument("--config-only", action="store_true",
                   help="read only the config (no weights; skips the counted total)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    add_logging_flags(p)


@subcommand("info", help="architecture and parameter breakdown of a model", setup=_info_setup)
def info_command(args: argparse.Namespace) -> int:
    """``minicompress info MODEL``: architecture table and parameter breakdown."""
    from .outputs import check_output, provenance

    if args.output:
        check_output(args.output, args.overwrite)
    from .recipes.info import model_info

    result = model_info(args.model, trust_remote_code=args.trust_remote_code, count=not args.config_only)
    arch = dict(result["architecture"])
    render_table(f"{args.model}: architecture", arch)
    rows = [{"component": r["component"], "parameters": r["count"], "% of total": f"{r['percent']:.2f}"}
            for r in result["parameters"]]
    if "counted_total" in result:
        rows.append({"component": "counted (unique tensors)", "parameters": result["counted_total"],
                     "% of total": "match" if result["counted_matches_closed_form"] else "MISMATCH"})
    render_table(f"{args.model}: parameters (closed form; tied lm_head counted once)", rows)
    if args.output:
        write_result(args.output, provenance("info", {"model": args.model}, results=result))
    return 0


# ----------------------------------------------------------------------------------------
# eval


def _eval_setup(p: argparse.ArgumentParser) -> None:
    add_common(p)
    add_model_flags(p, "model", default_help="; default smollm2-135m")
    add_model_flags(p, "teacher")
    add_data_flags(p)
    config_flag(p, "--stride", key="stride", help="sliding-window stride in tokens (default: non-overlapping)")
    config_flag(p, "--batch-size", key="batch_size", help="windows per forward pass (default 4)")
    config_flag(p, "--autocast", key="autocast", choices=AUTOCAST, help=AUTOCAST_HELP)
    config_flag(p, "--no-speed", key="speed", action="store_const", const=False,
                help="skip the prefill/decode speed test")
    config_flag(p, "--prefill-tokens", key="prefill_tokens", help="prompt length of the speed test")
    config_flag(p, "--decode-tokens", key="decode_tokens", help="generated tokens of the speed test")
    add_model_flags(p, "draft")
    config_flag(p, "--draft-prompts", key="draft_prompts",
                help="with --draft: prompts of the speculative-decoding test (default 8)")
    config_flag(p, "--draft-prompt-tokens", key="draft_prompt_tokens",
                help="with --draft: tokens per prompt, the start of a window of --data (default 64)")
    config_flag(p, "--draft-new-tokens", key="draft_new_tokens",
                help="with --draft: greedy tokens generated per prompt (default 64)")
    config_flag(p, "--draft-tokens", key="draft_tokens",
                help=f"with --draft: draft tokens proposed per teacher forward (default {DRAFT_TOKENS})")
    config_flag(p, "--tasks", key="tasks", metavar="TASK,...",
                help="lm-evaluation-harness tasks to score, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,"
                     "arc_challenge,openbookqa (pip install 'minicompress[tasks]'; --batch-size requests per forward; "
                     "without --data: accuracy only)")
    config_flag(p, "--compare", key="compare", metavar="SOURCE,...",
                help="more models evaluated the same way, a row each beside --model (e.g. the pruned, recovered "
                     "and quantized folders; same --dtype and --device)")
    config_flag(p, "--include-path", key="include_path", metavar="DIR",
                help="with --tasks: a folder of extra lm-eval task YAMLs (local tasks over JSONL files)")
    config_flag(p, "--num-fewshot", key="num_fewshot", metavar="N",
                help="with --tasks: examples per prompt (default: each task's own, 0 for the pruning papers' tasks)")
    config_flag(p, "--task-limit", key="task_limit", metavar="N",
                help="with --tasks: score only the first N documents of each task (a quick check)")


#: eval's draft results shown in its table (all of them go to the JSON)
_DRAFT_SHOWN = ("acceptance_rate", "draft_accepted_per_forward", "draft_tokens_per_forward", "draft_teacher_forwards",
                "draft_plain_teacher_forwards", "draft_plain_tokens_per_s", "draft_assisted_tokens_per_s",
                "draft_speedup", "draft_outputs_identical")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _task_rows(tasks: dict[str, dict]) -> list[dict]:
    """One row per lm-eval task: documents, acc and acc_norm with their standard errors."""
    rows = []
    for name, metrics in tasks.items():
        row = {"task": name, "n": metrics.get("n")}
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            row[key.replace("_stderr", " ±")] = metrics.get(key)
        if metrics.get("acc") is None and metrics.get("acc_norm") is None:  # other metrics (exact_match, ...)
            row["other"] = {k: v for k, v in metrics.items() if k != "n" and not k.endswith("_stderr")}
        rows.append({k: "-" if v is None else v for k, v in row.items()})
    return rows


def _compare_rows(cfg, results: dict) -> list[dict]:
    """``--compare``: one row per model (``--model`` first), size and speed as ratios to it."""
    rows = []
    for entry in [{"model": cfg.model.source, **results}, *results["compare"]]:
        row = {"model": Path(entry["model"]).name or entry["model"], "parameters": f"{entry.get('parameters', 0):,}",
               "size on disk": _mib(entry.get("size_on_disk_bytes")), "perplexity": entry.get("perplexity")}
        if "kl_to_teacher" in entry:
            row["KL to teacher"] = entry["kl_to_teacher"]
        for key, label in (("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s")):
            if entry.get(key) is not None:
                row[label] = f"{entry[key]:,.1f} ({entry[key] / results[key]:.2f}x)" if results.get(key) else entry[key]
        rows.append(row)
    return rows


@subcommand("eval", help="perplexity, teacher agreement, size and speed of a model", setup=_eval_setup)
def eval_command(args: argparse.Namespace) -> int:
    """``minicompress eval``: WikiText-style perplexity plus size and speed."""
    from .config import EvalConfig
    from .outputs import check_output, provenance

    teacher_flags = flags_to_overrides(args).get("teacher")
    if isinstance(teacher_flags, dict) and "source" not in teacher_flags and not args.config:
        raise ConfigError("--teacher: --teacher-dtype, --teacher-device and --teacher-trust-remote-code "
                          "need --teacher SOURCE")
    overrides = flags_to_overrides(args)
    draft_flags = [key for key in overrides if key.startswith("draft_")]
    if isinstance(overrides.get("draft"), dict) and "source" not in overrides["draft"] and not args.config:
        raise ConfigError("--draft: --draft-dtype, --draft-device and --draft-trust-remote-code need --draft SOURCE")
    cfg = build_from_args(EvalConfig, args)
    if draft_flags and cfg.draft is None:
        raise ConfigError(f"{_flag_names(args).get(draft_flags[0], draft_flags[0])}: needs --draft SOURCE")
    if cfg.output is not None:
        check_output(cfg.output, cfg.overwrite)
    from .recipes.eval import run_eval

    results = run_eval(cfg)
    shown = {key: value for key, value in results.items() if not key.startswith("draft_") and key != "acceptance_rate"}
    for key in ("size_on_disk_bytes", "eval_peak_memory_bytes", "speed_peak_memory_bytes"):
        if key in shown:
            shown[key.replace("_bytes", "")] = _mib(shown.pop(key))
    title = f"eval {cfg.model.source} on {cfg.data.source} (seq_len {cfg.data.seq_len}"
    title += f", stride {cfg.stride})" if cfg.stride else ")"
    if cfg.data.source is None:
        title = f"eval {cfg.model.source} (no --data: no perplexity)"
    shown.pop("tasks", None)
    shown.pop("compare", None)
    render_table(title, shown)
    if results.get("compare"):
        render_table(f"side by side on {cfg.data.source} (seq_len {cfg.data.seq_len})", _compare_rows(cfg, results))
    if "tasks" in results:
        shots = "each task's default shots" if cfg.num_fewshot is None else f"{cfg.num_fewshot}-shot"
        render_table(f"task accuracy of {cfg.model.source} (lm-evaluation-harness, {shots}"
                     + (f", first {cfg.task_limit} documents per task)" if cfg.task_limit else ")"),
                     _task_rows(results["tasks"]))
    if cfg.draft is not None:
        render_table(f"draft {Path(cfg.draft.source).name} for {Path(cfg.model.source).name} (greedy, "
                     f"{results['draft_prompts']} prompts, draft tokens per forward: {cfg.draft_tokens})",
                     {k: results[k] for k in _DRAFT_SHOWN})
    if cfg.output is not None:
        write_result(cfg.output, provenance("eval", cfg, results=results))
    return 0


# ----------------------------------------------------------------------------------------
# score and prune


def _scoring_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    from .config import AGGREGATIONS, AUTOCAST

    config_flag(p, "--num-samples", key=f"{prefix}num_samples",
                help="calibration sequences (Minitron used 1024; default 1024 for score, 256 for prune)")
    config_flag(p, "--batch-size", key=f"{prefix}batch_size", help="sequences per forward pass (default 8)")
    config_flag(p, "--batch-aggregation", key=f"{prefix}batch_aggregation", choices=AGGREGATIONS,
                help="how per-sample scores combine (default l2, the paper's best)")
    config_flag(p, "--sequence-aggregation", key=f"{prefix}sequence_aggregation", choices=AGGREGATIONS,
                help="how per-token activations combine (default mean, the paper's best)")
    config_flag(p, "--loss-samples", key=f"{prefix}loss_samples",
                help="sequences for the per-layer loss-drop score (0: skip it)")
    config_flag(p, "--no-layer-scores", key=f"{prefix}layer_scores", action="store_const", const=False,
                help="skip the per-layer loss-drop score (Block Importance is always computed)")
    config_flag(p, "--score-autocast", key=f"{prefix}autocast", choices=AUTOCAST,
                help="calibration forward precision; " + AUTOCAST_HELP)


def _score_setup(p: argparse.ArgumentParser) -> None:
    add_common(p, output_help="folder for scores.safetensors, scores.json and minicompress.json")
    add_model_flags(p, "model", default_help="; default smollm2-135m")
    add_data_flags(p)
    _scoring_flags(p)


def _layer_rows(scores) -> list[dict]:
    bi = scores.block_importance
    rows = []
    for i in range(bi.numel()):
        row = {"layer": i, "block importance": float(bi[i])}
        if scores.layer_loss is not None:
            row["loss increase if dropped"] = float(scores.layer_loss[i])
        rows.append(row)
    return rows


@subcommand("score", help="importance of heads, neurons, channels and layers on calibration data",
            setup=_score_setup)
def score_command(args: argparse.Namespace) -> int:
    """``minicompress score``: Minitron activation importance, written for reuse by ``prune``."""
    from .recipes.score import score
    from .config import ScoreConfig
    from .distributed import is_main

    cfg = build_from_args(ScoreConfig, args, output_needed_for="score needs a folder to write the scores to")
    scores = score(cfg)
    if is_main():  # torchrun: one table, from rank 0
        render_table(f"layer scores of {cfg.model.source} ({scores.meta['num_samples']} samples x "
                     f"{scores.meta['seq_len']} tokens, {scores.meta['seconds']:.0f}s)", _layer_rows(scores))
    return 0


def _prune_setup(p: argparse.ArgumentParser) -> None:
    from .config import LAYER_METRICS, REPAIR_DAMPING_SCALES, REPAIR_RIDGES

    add_common(p, output_help="folder for the pruned Hugging Face model")
    add_model_flags(p, "model", default_help="; default smollm2-135m")
    add_data_flags(p)
    config_flag(p, "--scores", key="scores", metavar="DIR", help="reuse scores written by minicompress score")
    _scoring_flags(p, "score.")
    config_flag(p, "--target-params", key="target.target_params",
                help="parameter budget: a ratio (0.5) or a count (70M); searches uniform shapes near it")
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "num_hidden_layers"):
        config_flag(p, "--" + name.replace("_", "-"), key=f"target.{name}", help=f"new {name}")
    config_flag(p, "--drop-layers", key="target.drop_layers", metavar="I,J,...", help="layer indices to drop")
    config_flag(p, "--layer-metric", key="target.layer_metric", choices=LAYER_METRICS,
                help="how layers are chosen when depth shrinks (default bi: Block Importance)")
    config_flag(p, "--no-norm-correction", key="target.norm_correction", action="store_const", const=False,
                help="keep norm weights as they are after removing embedding channels")
    config_flag(p, "--search-batches", key="search_batches",
                help="calibration batches (of 2 sequences) that rank candidate shapes (default 4)")
    config_flag(p, "--width-multiple", key="target.width_multiple",
                help="--target-params: hidden and FFN sizes are multiples of this (default 64; 1: any)")
    config_flag(p, "--search-distill-candidates", key="search_distill_candidates",
                help="--target-params: distil this many best zero-shot shapes briefly and keep the lowest "
                     "held-out KL, as Minitron did (default 4; 0: keep the best zero-shot shape)")
    config_flag(p, "--search-distill-tokens", key="search_distill_tokens",
                help="training tokens of each candidate's short distillation (default 64K; settings: "
                     "search_recover.<key>=value)")
    config_flag(p, "--resume", key="resume", action="store_const", const=True,
                help="--target-params: continue an interrupted search from <output>.partial")
    config_flag(p, "--streaming", key="streaming", action="store_const", const=True,
                help="prune a local safetensors checkpoint one tensor at a time without loading it "
                     "(needs --scores and explicit sizes or --drop-layers)")
    config_flag(p, "--repair", key="repair", metavar="NAME,...",
                help="closed-form repairs after pruning, comma-separated: none (default), refit (down_proj), "
                     "refit_o (o_proj), flap (bias; llama), replaceme (dropped layers as a linear map)")
    config_flag(p, "--repair-damping", key="repair_damping", metavar="D,...",
                help="relative ridge of the refits (default 0.01); several: chosen per linear on held-out batches")
    config_flag(p, "--repair-tokens", key="repair_tokens",
                help="calibration tokens the repairs read, from the scoring's rows (default 32K)")
    config_flag(p, "--repair-keep-scale", key="repair_keep_scale", action="store_const", const=True,
                help="keep each refit row's norm from the plainly pruned weight")
    config_flag(p, "--repair-ridge", key="repair_ridge", choices=REPAIR_RIDGES,
                help="centre of the refit's ridge: zero (default) or pruned (a damped correction of the prune)")
    config_flag(p, "--repair-damping-scale", key="repair_damping_scale", choices=REPAIR_DAMPING_SCALES,
                help="damping relative to the mean input energy (default mean, GPTQ) or to each input's own (diagonal)")


@subcommand("prune", help="score, plan and rewrite a model into a smaller stock HF model", setup=_prune_setup)
def prune_command(args: argparse.Namespace) -> int:
    """``minicompress prune``: writes a stock HF folder plus ``minicompress.json``."""
    from .recipes.prune import prune
    from .config import PruneConfig

    cfg = build_from_args(PruneConfig, args, output_needed_for="prune needs a folder for the pruned model")
    try:
        report = prune(cfg)
    except MinicompressError as err:
        raise name_flag(err, args) from None
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size")
    rows = [{"": k, "original": report["original"][k], "pruned": report["pruned"][k]} for k in keys]
    rows.append({"": "parameters", "original": report["parameters"]["original"],
                 "pruned": report["parameters"]["pruned"]})
    rows.append({"": "ratio", "original": 1.0, "pruned": report["parameters"]["ratio"]})
    render_table(f"pruned {cfg.model.source} -> {cfg.output}", rows)
    if report.get("search"):
        _render_search(report["search"])
    return 0


def _render_search(table: list[dict]) -> None:
    """The prune's search table: distilled candidates (by KL after distillation), then the
    other finalists (by zero-shot loss), then the rest (by screening loss); 10 rows."""
    def order(r):
        if "distill_kl" in r:
            return (0, r["distill_kl"])
        return (1, r["loss"]) if "loss" in r else (2, r["screen_loss"])

    rows = sorted(table, key=order)[:10]
    distilled = any("distill_kl" in r for r in table)
    shown = []
    for r in rows:
        row = {"h/q/kv/ffn/L": f"{r['hidden_size']}/{r['num_attention_heads']}/{r['num_key_value_heads']}/"
                               f"{r['intermediate_size']}/{r['num_hidden_layers']}",
               "depth by": r["layer_metric"] if r.get("dropped_layers") else "",
               "params": r["params"], "screen": r["screen_loss"], "loss": r.get("loss", "")}
        if distilled:  # held-out KL to the original before / after the short distillation
            row.update({"KL 0-shot": r.get("kl_before", ""), "KL KD": r.get("distill_kl", ""),
                        "ppl KD": r.get("distill_perplexity", ""),
                        "prefill tok/s": r.get("prefill_tokens_per_s", ""),
                        "decode tok/s": r.get("decode_tokens_per_s", "")})
        row["chosen"] = "*" if r.get("chosen") else ""
        shown.append(row)
    how = "by held-out KL after a short distillation" if distilled else "by zero-shot loss"
    render_table(f"architecture search ({how}): best {len(rows)} of {len(table)} candidates", shown)


# ----------------------------------------------------------------------------------------
# recover and teacher-cache


def _recover_setup(p: argparse.ArgumentParser) -> None:
    from .config import LOSS_KINDS

    add_common(p, output_help="folder for the recovered Hugging Face model")
    add_model_flags(p, "student", key="student")
    add_model_flags(p, "teacher")
    add_data_flags(p)
    config_flag(p, "--teacher-cache", key="teacher_cache", metavar="DIR",
                help="train from the sparse teacher targets written by minicompress teacher-cache")
    config_flag(p, "--tokens", key="tokens", help="training budget in tokens (e.g. 2M)")
    config_flag(p, "--global-batch-tokens", key="global_batch_tokens", help="tokens per optimizer step")
    config_flag(p, "--micro-batch-size", key="micro_batch_size", help="sequences per forward")
    config_flag(p, "--lr", key="lr", help="peak learning rate (AdamW)")
    config_flag(p, "--min-lr", key="min_lr", help="final learning rate of the cosine decay")
    config_flag(p, "--warmup-steps", key="warmup_steps", help="linear warmup steps")
    config_flag(p, "--loss", key="loss.kind", choices=LOSS_KINDS, help="logit divergence (default forward_kl)")
    config_flag(p, "--temperature", key="loss.temperature", help="softmax temperature (default 1)")
    config_flag(p, "--kl-weight", key="loss.kl_weight", help="weight of the logit divergence (default 1)")
    config_flag(p, "--ce-weight", key="loss.ce_weight", help="weight of cross-entropy on the text (default 0: forward KL alone)")
    config_flag(p, "--intermediate-weight", key="loss.intermediate_weight",
                help="> 0 adds Minitron's intermediate-state loss (dynamic weight)")
    config_flag(p, "--autocast", key="autocast", choices=AUTOCAST, help=AUTOCAST_HELP)
    config_flag(p, "--eval-every", key="eval_every", help="optimizer steps between held-out evaluations")
    config_flag(p, "--save-every", key="save_every", help="optimizer steps between checkpoints")
    config_flag(p, "--resume", key="resume", action="store_const", const=True,
                help="continue from the last checkpoint in <output>.partial")
    config_flag(p, "--activation-checkpointing", key="activation_checkpointing", action="store_const", const=True,
                help="recompute layer activations in backward (less memory, about 1/3 more compute)")
    config_flag(p, "--compile", key="compile", choices=("auto", "true", "false"),
                help="torch.compile the decoder layers; auto (default): for runs of >= 262,144 tokens in one process "
                     "with a compiler backend")
    config_flag(p, "--no-reshard-after-forward", key="reshard_after_forward", action="store_const", const=False,
                help="torchrun/FSDP2: keep each layer's gathered weights from forward to backward (faster, more memory)")


@subcommand("recover", help="distil a pruned student from its frozen teacher", setup=_recover_setup)
def recover_command(args: argparse.Namespace) -> int:
    """``minicompress recover``: knowledge-distillation recovery; writes a stock HF folder."""
    from .config import RecoverConfig
    from .recipes.recover import recover
    from .distributed import is_main

    cfg = build_from_args(RecoverConfig, args, output_needed_for="recover needs a folder for the recovered model")
    report = recover(cfg)
    shown = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    for phase in ("before", "after"):
        for key, value in (report.get(phase) or {}).items():
            if not isinstance(value, (dict, list)):
                shown[f"{phase} {key}"] = value
    if is_main():  # torchrun: one table, from rank 0
        render_table(f"recovered {cfg.student.source} -> {cfg.output}", shown)
    return 0


def _teacher_cache_setup(p: argparse.ArgumentParser) -> None:
    add_common(p, output_help="folder for the teacher-target shards")
    add_model_flags(p, "teacher")
    add_data_flags(p)
    config_flag(p, "--tokens", key="tokens", help="tokens to cache (e.g. 2M)")
    config_flag(p, "--kind", key="kind", choices=("sampled", "topk"),
                help="sampled (default): tokens drawn from the teacher, unbiased; topk: largest logits")
    config_flag(p, "--samples", key="samples", help="tokens drawn per position with --kind sampled (default 12)")
    config_flag(p, "--top-k", key="top_k", help="logits kept per token with --kind topk (default 64)")
    config_flag(p, "--micro-batch-size", key="micro_batch_size", help="sequences per forward")
    config_flag(p, "--shard-tokens", key="shard_tokens", help="tokens per safetensors shard")
    config_flag(p, "--autocast", key="autocast", choices=AUTOCAST, help=AUTOCAST_HELP)


@subcommand("teacher-cache", help="write a teacher's sampled tokens or top-k logits for offline distillation",
            setup=_teacher_cache_setup)
def teacher_cache_command(args: argparse.Namespace) -> int:
    """``minicompress teacher-cache``: sparse teacher targets as safetensors shards."""
    from .config import TeacherCacheConfig
    from .recipes.teacher_cache import write_teacher_cache

    cfg = build_from_args(TeacherCacheConfig, args, output_needed_for="teacher-cache needs a folder for the shards")
    report = write_teacher_cache(cfg)
    render_table(f"teacher cache {cfg.teacher.source} -> {cfg.output}",
                 {k: v for k, v in report.items() if not isinstance(v, (dict, list))})
    return 0


def _generate_setup(p: argparse.ArgumentParser) -> None:
    add_common(p, output_help="folder: a teacher cache for recover --teacher-cache, plus text.jsonl")
    add_model_flags(p, "teacher")
    add_data_flags(p)
    config_flag(p, "--tokens", key="tokens", help="tokens to generate, whole rows of --seq-len (e.g. 1M)")
    config_flag(p, "--prompt-tokens", key="prompt_tokens",
                help="with --data: the first tokens of its sequences start the rows (default 4); without "
                     "--data each row starts from one vocabulary id (LLM-QAT)")
    config_flag(p, "--greedy-tokens", key="greedy_tokens", help="generated tokens taken greedily first (default 3)")
    config_flag(p, "--top-k", key="top_k", help="sample from the k most likely tokens (default 50; 0: all)")
    config_flag(p, "--top-p", key="top_p", help="nucleus mass (default 1: off)")
    config_flag(p, "--temperature", key="temperature", help="sampling temperature (default 1)")
    config_flag(p, "--samples", key="samples", help="sparse teacher targets kept per position (default 12)")
    config_flag(p, "--batch-size", key="batch_size", help="rows decoded together (default 64)")
    config_flag(p, "--workers", key="workers",
                help="processes writing shards side by side (default 0: one single-threaded process per CPU "
                     "core, up to 8; 1 on a GPU); the output does not depend on it")
    config_flag(p, "--resume", key="resume", action="store_const", const=True,
                help="continue an interrupted run from <output>.partial")
    config_flag(p, "--autocast", key="autocast", choices=AUTOCAST, help=AUTOCAST_HELP)


@subcommand("generate", help="sample recovery text from the teacher with its sparse targets (data-free distillation)",
            setup=_generate_setup)
def generate_command(args: argparse.Namespace) -> int:
    """``minicompress generate``: the teacher's own text, as a teacher cache plus JSONL."""
    from .config import GenerateConfig
    from .recipes.generate import generate

    cfg = build_from_args(GenerateConfig, args, output_needed_for="generate needs a folder to write to")
    report = generate(cfg)
    render_table(f"generated by {cfg.teacher.source} -> {cfg.output}",
                 {k: v for k, v in report.items() if not isinstance(v, (dict, list))})
    return 0


# ----------------------------------------------------------------------------------------
# quantize


def _quantize_setup(p: argparse.ArgumentParser) -> None:
    from .config import QUANTIZE_SCHEMES

    add_common(p, output_help="folder for the quantized Hugging Face model")
    add_model_flags(p, "model", default_help="; default smollm2-135m")
    config_flag(p, "--scheme", key="scheme", choices=QUANTIZE_SCHEMES,
                help="int8-weight-only (default; symmetric, per output channel) or int4-weight-only "
                     "(asymmetric, per group of --group-size input channels)")
    config_flag(p, "--group-size", key="group_size",
                help="input channels per scale (default: per output channel for int8, 32 for int4)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to this file")


@subcommand("quantize", help="int8 / int4 weight-only quantization with torchao, saved as a Hugging Face folder",
            setup=_quantize_setup)
def quantize_command(args: argparse.Namespace) -> int:
    """``minicompress quantize``: round-to-nearest weight-only quantization of the linear layers."""
    from .config import QuantizeConfig
    from .outputs import check_output
    from .recipes.quantize import quantize

    cfg = build_from_args(QuantizeConfig, args, output_needed_for="quantize needs a folder for the quantized model")
    if args.json:
        if Path(args.json).expanduser().resolve() == Path(cfg.output).expanduser().resolve():
            raise ConfigError("--json: must differ from --output (the model folder)")
        check_output(args.json, cfg.overwrite, flag="--json")
    try:
        report = quantize(cfg)
    except MinicompressError as err:
        raise name_flag(err, args) from None
    group = report["group_size"]
    render_table(f"quantized {cfg.model.source} -> {cfg.output}", {
        "scheme": report["scheme"], "group size": "per output channel" if group is None else group,
        "quantized linears": report["quantized_linears"], "quantized weights": report["quantized_parameters"],
        "size on disk before": _mib(report["size_before_bytes"]), "size on disk after": _mib(report["size_after_bytes"]),
        "size ratio": report["size_ratio"], "seconds": report["seconds"]})
    if args.json:
        write_result(args.json, report)
    return 0


# ----------------------------------------------------------------------------------------
# run: progressive stages from one config


def _run_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml",
                   help="the run: model, data, eval_data, output, score, recover and a list of stages")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set recover.lr=1e-4 (also accepted as trailing KEY=VALUE)")
    config_flag(p, "--output", "-o", key="output", metavar="DIR", help="the run folder (default: output: in the YAML)")
    config_flag(p, "--overwrite", key="overwrite", action="store_const", const=True,
                help="start over, replacing the run folder (without it, a rerun skips finished stages)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole config and show each stage's shape, parameters, token budget and "
                        "memory; loads no weights")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="with --dry-run: memory per rank of a torchrun + FSDP2 run on N processes (default 1)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 helps when other jobs share the cores)")
    add_logging_flags(p)


def _shape_cell(shape: dict) -> str:
    return "/".join(str(shape[k]) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                            "intermediate_size", "num_hidden_layers"))


def _count(n: int) -> str:
    """``134,515,008`` as ``134.5M``, ``94,000,000,000`` as ``94B``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.4g}{unit}"
    return str(n)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:,.2f} GiB"


@subcommand("run", help="progressive prune + distil stages from one YAML config, then a side-by-side report",
            setup=_run_setup)
def run_stages_command(args: argparse.Namespace) -> int:
    """``minicompress run CONFIG.yaml [--dry-run]``: every stage, then ``report.json/.md/.png``."""
    from .config import RunConfig
    from .recipes.run import REPORT_COLUMNS, REPORT_JSON, dry_run, run

    if not Path(args.config).expanduser().is_file():
        raise ConfigError(f"CONFIG.yaml: file not found: {args.config}")
    cfg = build_from_args(RunConfig, args)
    if args.dry_run:
        if args.ranks < 1:
            raise ConfigError(f"--ranks: must be >= 1, got {args.ranks}")
        plan = dry_run(cfg, ranks=args.ranks)
        original = plan["original"]
        total = original["parameters"]["total"]
        rows = [{"stage": 0, "name": "original", "h/q/kv/ffn/L": _shape_cell(original), "params": _count(total),
                 "ratio": 1.0, "tokens": "", "teacher": "", "memory": ""}]
        for r in plan["stages"]:
            rows.append({"stage": r["stage"], "name": r["name"],
                         "h/q/kv/ffn/L": "search" if r["hidden_size"] is None else _shape_cell(r),
                         "params": _count(r["params"]) if r["params"] is not None else "run time",
                         "ratio": r["ratio"] if r["ratio"] is not None else "run time",
                         "tokens": _count(r["tokens"]) if r["tokens"] else "0 (prune only)",
                         "teacher": r["teacher"] if r["tokens"] else "-",
                         "memory": _gib(r["memory_bytes"])})
        per = f", memory per rank of {args.ranks}" if args.ranks > 1 else ""
        render_table(f"dry run of {args.config}: {cfg.model.source} in {len(plan['stages'])} stage(s), "
                     f"no weights loaded{per}", rows)
        notes = [f"stage {r['stage']} ({r['name']}): {r['note']}" for r in plan["stages"] if r["note"]]
        if plan.get("generate"):
            gen = plan["generate"]
            starts = f"the first tokens of {gen['prompts']}" if gen["prompts"] else "single start tokens (LLM-QAT)"
            notes.insert(0, f"data-free: the original first writes {gen['tokens']:,} tokens in rows of "
                            f"{gen['seq_len']} from {starts} into OUTPUT/{gen['output']}; every stage calibrates "
                            "on that text, and stages taught by the original recover from its sparse targets")
        console = _console()
        for note in notes:
            console.print(note, markup=False)
        if args.ranks > 1:
            console.print(f"memory: per rank of {args.ranks} (torchrun + FSDP2) for the recovery: sharded student "
                          "weights + grads + AdamW and teacher weights, gathered layers, root groups, activations "
                          "(README: Large models); prune whole checkpoints with prune --streaming", markup=False)
            return 0
        console.print("memory: one process; recovery = weights + grads + AdamW moments of the student (16 bytes "
                      "per parameter in float32) + teacher weights + activations, pruning = input + pruned "
                      "weights (README: Progressive runs)", markup=False)
        return 0
    if cfg.output is None:
        raise ConfigError("--output: a run needs a folder (--output DIR, or output: in the YAML)")
    result = run(cfg)
    report = result["report"]
    if report is None:  # torchrun: rank 0 reports
        return 0
    shown = []
    task_columns = [c for c in report["columns"] if c.endswith("/acc") and c not in REPORT_COLUMNS]
    for row in report["rows"]:
        shown.append({"model": row["model"], "params": _count(row["parameters"]), "ratio": row["ratio"],
                      "size": _mib(row["size_on_disk_bytes"]), "ppl": row["perplexity"], "KL": row["kl_to_original"],
                      "top-1": row["top1_agreement"],
                      **{c.removesuffix("/acc"): row.get(c) for c in task_columns},
                      "decode tok/s": row["decode_tokens_per_s"],
                      "wall s": row["wall_time_s"], "tokens": _count(row["tokens"]) if row["tokens"] else "-"})
        shown[-1] = {k: "-" if v is None else v for k, v in shown[-1].items()}
    where = f" on {report['eval_data']['source']}" if report.get("eval_data") else " (no eval_data: no perplexity)"
    accuracy = "; task columns: lm-eval acc" if task_columns else ""
    render_table(f"run {args.config}{where}; KL / top-1 against the original{accuracy}", shown)
    log.info("wrote %s", Path(result["output"]) / REPORT_JSON)
    return 0


# ----------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered subcommand."""
    from . import __version__

    parser = _Parser(prog="minicompress",
                     description="Minitron-style pruning and distillation of Hugging Face causal LMs.",
                     epilog="Config keys can be set with --config FILE.yaml, flags, and trailing key.sub=value "
                            "overrides (highest priority).")
    parser.add_argument("--version", action="version", version=f"minicompress {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, sub in SUBCOMMANDS.items():
        p = subs.add_parser(name, help=sub.help, description=sub.help,
                            epilog="Trailing key.sub=value words override config keys "
                                   "(defaults < --config < flags < key=value).")
        sub.setup(p)
        p.set_defaults(_subcommand=name, _flag_names={
            a.dest[len(CFG_PREFIX):]: a.option_strings[0] for a in p._actions if a.dest.startswith(CFG_PREFIX)})
    return parser


def _quiet_transformers(verbose: bool = False) -> None:
    """Keep transformers' own output out of minicompress's rich output, unless ``-v``.

    transformers draws tqdm bars ("Loading weights", "Writing model shards") and emits
    deprecation notices (``past_key_values`` is deprecated: a FutureWarning plus a log
    line) that interleave with minicompress's progress bars and tables. By default the
    bars and its log messages below ERROR are off and FutureWarnings are ignored (the
    caller scopes the filter with ``warnings.catch_warnings``); ``-v`` shows them all.
    torchao's import-time warnings (:func:`minicompress.quantize.quiet_torchao_logs`) are dropped too.
    """
    if verbose:
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
            hf_logging.set_verbosity_warning()
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .quantize import quiet_torchao_logs

    quiet_torchao_logs()  # transformers imports torchao (when installed) with every model it loads
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minicompress`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 on a user error.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "command", None) is None:
            parser.print_help(sys.stderr)
            return 2
        overrides = [a for a in extra if _OVERRIDE_RE.match(a)]
        unknown = [a for a in extra if not _OVERRIDE_RE.match(a)]
        if unknown:
            raise _UsageError(f"minicompress {args.command}: unrecognized arguments: {' '.join(unknown)} "
                              f"(see minicompress {args.command} --help)")
        if overrides:
            if not hasattr(args, "overrides"):
                raise _UsageError(f"minicompress {args.command}: takes no key=value overrides: {' '.join(overrides)}")
            args.overrides = list(args.overrides) + overrides
    except _UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print(f"error: --threads: must be >= 1, got {threads}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    previous = os.environ.get("MINICOMPRESS_PROGRESS")
    if getattr(args, "quiet", False):
        os.environ["MINICOMPRESS_PROGRESS"] = "0"
    previous_threads = None
    if threads is not None:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            _quiet_transformers(getattr(args, "verbose", False))
            status = run_command(SUBCOMMANDS[args._subcommand].run, args)
        if status == 0 and "torch" in sys.modules:  # under torchrun: leave the process group together
            from .distributed import finish

            finish()
        return status
    finally:
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)
        if getattr(args, "quiet", False):
            if previous is None:
                os.environ.pop("MINICOMPRESS_PROGRESS", None)
            else:
                os.environ["MINICOMPRESS_PROGRESS"] = previous

if __name__ == "__main__":
    raise SystemExit(main())
