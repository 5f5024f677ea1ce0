"""The ``minicompress`` command line: one registry of subcommands.

Every subcommand is one function registered with :func:`subcommand`, naming its config
dataclass; its flags are generated from that class (:mod:`minicompress.flags`: one flag
per documented field, ``--seq-len`` for ``data.seq_len``), so a new setting is a field
and its docstring line in :mod:`minicompress.config`, nothing here. ``setup`` adds the
flags that set no config key (``--config``, ``--set``, ``--threads``, ``-v/-q``, ``--json``).

Priority, lowest to highest: the dataclass defaults, ``--config file.yaml``, flags
(``--seq-len 512``), explicit ``key.sub=value`` overrides (trailing, or ``--set``).

A subcommand returns an exit status; :func:`run_command` turns a
:class:`~minicompress.errors.MinicompressError` into ``error: <message>`` on stderr and
exit status 2. Results are printed by the renderers of :mod:`minicompress.reports` and
written as JSON with :func:`~minicompress.reports.write_result` (atomically, never over
an existing file without ``--overwrite``).

Adding a subcommand::

    @subcommand("prune", help="prune a model", config=PruneConfig,
                exclude={"search_recover": "a mapping: search_recover.<key>=value"})
    def prune_command(args):
        cfg = build_from_args(PruneConfig, args, output_needed_for="prune needs a folder")
        render_prune(cfg, prune(cfg))
        return 0
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import reports
from .config import (CorrectConfig, EvalConfig, GenerateConfig, PruneConfig, QuantizeConfig, RecoverConfig, RunConfig,
                     ScoreConfig, TeacherCacheConfig)
from .errors import ConfigError, MinicompressError
from .flags import (CFG_PREFIX, add_common, add_config_flags, add_logging_flags, add_set_flag, add_threads_flag,
                    build_from_args, flag_names, flags_to_overrides, name_flag)
from .reports import render_table, setup_logging, write_result

__all__ = ["SUBCOMMANDS", "Subcommand", "build_from_args", "build_parser", "flags_to_overrides", "main", "name_flag",
           "render_table", "run_command", "setup_logging", "subcommand", "write_result"]

log = logging.getLogger("minicompress")

_OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.]*=")


# ----------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand.

    Attributes:
        name: the word after ``minicompress``.
        help: one line shown by ``minicompress --help``.
        setup: adds the subcommand's own flags (those that set no config key) to its parser.
        run: takes the parsed namespace, returns an exit status.
        config: the config dataclass whose fields become flags (None: no generated flags).
        exclude: dotted config keys given no flag, each with the reason (they stay
            settable in YAML and as ``key=value``).
        only: the top-level fields given flags (None: all but ``exclude``).
    """

    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    config: type | None = None
    exclude: Mapping[str, str] = field(default_factory=dict)
    only: tuple[str, ...] | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, *, help: str, setup: Callable[[argparse.ArgumentParser], None] = add_common,
               config: type | None = None, exclude: Mapping[str, str] | None = None,
               only: tuple[str, ...] | None = None):
    """Decorator registering ``fn(args) -> int`` as ``minicompress <name>``.

    Args:
        name: the subcommand word.
        help: one-line description.
        setup: ``setup(parser)`` adds the flags that set no config key (default
            :func:`~minicompress.flags.add_common`).
        config: the config dataclass whose documented fields become flags.
        exclude: ``{dotted key: reason}`` of fields without a flag.
        only: the only top-level fields given flags.
    """

    def register(fn: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, setup, fn, config, dict(exclude or {}), only)
        return fn

    return register


class _UsageError(Exception):
    """An argparse usage error, reported as one line like a MinicompressError."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------------------
# Errors


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
    reports.render_info(args.model, result)
    if args.output:
        write_result(args.output, provenance("info", {"model": args.model}, results=result))
    return 0


# ----------------------------------------------------------------------------------------
# eval, score, prune


@subcommand("eval", help="perplexity, teacher agreement, size and speed of a model", config=EvalConfig)
def eval_command(args: argparse.Namespace) -> int:
    """``minicompress eval``: WikiText-style perplexity plus size and speed."""
    from .outputs import check_output, provenance

    overrides = flags_to_overrides(args)
    for model in ("teacher", "draft"):
        if isinstance(overrides.get(model), dict) and "source" not in overrides[model] and not args.config:
            raise ConfigError(f"--{model}: --{model}-dtype, --{model}-device and --{model}-trust-remote-code "
                              f"need --{model} SOURCE")
    draft_flags = [key for key in overrides if key.startswith("draft_")]
    cfg = build_from_args(EvalConfig, args)
    if draft_flags and cfg.draft is None:
        raise ConfigError(f"{flag_names(args).get(draft_flags[0], draft_flags[0])}: needs --draft SOURCE")
    if cfg.output is not None:
        check_output(cfg.output, cfg.overwrite)
    from .recipes.eval import run_eval

    results = run_eval(cfg)
    reports.render_eval(cfg, results)
    if cfg.output is not None:
        write_result(cfg.output, provenance("eval", cfg, results=results))
    return 0


@subcommand("score", help="importance of heads, neurons, channels and layers on calibration data",
            config=ScoreConfig)
def score_command(args: argparse.Namespace) -> int:
    """``minicompress score``: Minitron activation importance, written for reuse by ``prune``."""
    from .recipes.score import score
    from .distributed import is_main

    cfg = build_from_args(ScoreConfig, args, output_needed_for="score needs a folder to write the scores to")
    scores = score(cfg)
    if is_main():  # torchrun: one table, from rank 0
        reports.render_score(cfg, scores)
    return 0


@subcommand("prune", help="score, plan and rewrite a model into a smaller stock HF model", config=PruneConfig,
            exclude={"score.model": "scoring uses the prune's own --model", "score.data": "and its --data",
                     "score.output": "scores are written with the pruned model", "score.overwrite": "(--overwrite)",
                     "search_recover": "a mapping: set its keys as search_recover.<key>=value"})
def prune_command(args: argparse.Namespace) -> int:
    """``minicompress prune``: writes a stock HF folder plus ``minicompress.json``."""
    from .recipes.prune import prune

    cfg = build_from_args(PruneConfig, args, output_needed_for="prune needs a folder for the pruned model")
    try:
        report = prune(cfg)
    except MinicompressError as err:
        raise name_flag(err, args) from None
    reports.render_prune(cfg, report)
    return 0


# ----------------------------------------------------------------------------------------
# recover, correct, teacher-cache, generate, quantize


@subcommand("recover", help="distil a pruned student from its frozen teacher", config=RecoverConfig,
            exclude={"seed": "--seed is data.seed; set this one as seed=N",
                     "teachers": "a repeated --teacher adds one (--teacher A --teacher B); a teacher cache: "
                                 "teachers: [{cache: DIR}] in YAML",
                     # recover loads its teacher in teacher_dtype on teacher_device (teacher.dtype/device
                     # would be replaced by them), so --teacher-dtype / --teacher-device set those
                     "teacher.dtype": "recover places the teacher by teacher_dtype (--teacher-dtype)",
                     "teacher.device": "recover places the teacher by teacher_device (--teacher-device)"})
def recover_command(args: argparse.Namespace) -> int:
    """``minicompress recover``: knowledge-distillation recovery; writes a stock HF folder."""
    from .recipes.recover import recover
    from .distributed import is_main

    cfg = build_from_args(RecoverConfig, args, output_needed_for="recover needs a folder for the recovered model")
    report = recover(cfg)
    if is_main():  # torchrun: one table, from rank 0
        reports.render_recover(cfg, report)
    return 0


@subcommand("correct", help="teacher correction: fine-tune the unpruned teacher on the distillation text first",
            config=CorrectConfig, exclude={"seed": "--seed is data.seed; set this one as seed=N",
                                           "teacher.dtype": "correct trains float32 master weights"})
def correct_command(args: argparse.Namespace) -> int:
    """``minicompress correct``: a fine-tuned copy of the teacher, written as a stock HF folder."""
    from .recipes.correct import correct

    cfg = build_from_args(CorrectConfig, args, output_needed_for="correct needs a folder for the corrected teacher")
    try:
        report = correct(cfg)
    except MinicompressError as err:
        raise name_flag(err, args) from None
    reports.render_correct(cfg, report)
    return 0


@subcommand("teacher-cache", help="write a teacher's sampled tokens or top-k logits for offline distillation",
            config=TeacherCacheConfig)
def teacher_cache_command(args: argparse.Namespace) -> int:
    """``minicompress teacher-cache``: sparse teacher targets as safetensors shards."""
    from .recipes.teacher_cache import write_teacher_cache

    cfg = build_from_args(TeacherCacheConfig, args, output_needed_for="teacher-cache needs a folder for the shards")
    report = write_teacher_cache(cfg)
    render_table(f"teacher cache {cfg.teacher.source} -> {cfg.output}", reports.scalars(report))
    return 0


@subcommand("generate", help="sample recovery text from the teacher with its sparse targets (data-free distillation)",
            config=GenerateConfig, exclude={"seed": "--seed is data.seed; set this one as seed=N"})
def generate_command(args: argparse.Namespace) -> int:
    """``minicompress generate``: the teacher's own text, as a teacher cache plus JSONL."""
    from .recipes.generate import generate

    cfg = build_from_args(GenerateConfig, args, output_needed_for="generate needs a folder to write to")
    report = generate(cfg)
    render_table(f"generated by {cfg.teacher.source} -> {cfg.output}", reports.scalars(report))
    return 0


def _quantize_setup(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to this file")


@subcommand("quantize", help="int8 / int4 weight-only quantization with torchao, saved as a Hugging Face folder",
            setup=_quantize_setup, config=QuantizeConfig)
def quantize_command(args: argparse.Namespace) -> int:
    """``minicompress quantize``: round-to-nearest weight-only quantization of the linear layers."""
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
    reports.render_quantize(cfg, report)
    if args.json:
        write_result(args.json, report)
    return 0


# ----------------------------------------------------------------------------------------
# run: progressive stages from one config


def _run_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml",
                   help="the run: model, data, eval_data, output, score, recover and a list of stages")
    add_set_flag(p, "recover.lr=1e-4")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole config and show each stage's shape, parameters, token budget and "
                        "memory; loads no weights")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="with --dry-run: memory per rank of a torchrun + FSDP2 run on N processes (default 1)")
    add_threads_flag(p)
    add_logging_flags(p)


@subcommand("run", help="progressive prune + distil stages from one YAML config, then a side-by-side report",
            setup=_run_setup, config=RunConfig, only=("output", "overwrite"))
def run_stages_command(args: argparse.Namespace) -> int:
    """``minicompress run CONFIG.yaml [--dry-run]``: every stage, then ``report.json/.md/.png``."""
    from .recipes.run import REPORT_JSON, dry_run, run

    if not Path(args.config).expanduser().is_file():
        raise ConfigError(f"CONFIG.yaml: file not found: {args.config}")
    cfg = build_from_args(RunConfig, args)
    if args.dry_run:
        if args.ranks < 1:
            raise ConfigError(f"--ranks: must be >= 1, got {args.ranks}")
        reports.render_dry_run(args.config, cfg, dry_run(cfg, ranks=args.ranks), args.ranks)
        return 0
    if cfg.output is None:
        raise ConfigError("--output: a run needs a folder (--output DIR, or output: in the YAML)")
    result = run(cfg)
    if result["report"] is None:  # torchrun: rank 0 reports
        return 0
    reports.render_run(args.config, result["report"])
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
                                   "(defaults < --config < flags < key=value). Counts take k/M/B (16k, 2M).")
        sub.setup(p)
        if sub.config is not None:
            add_config_flags(p, sub.config, exclude=sub.exclude, only=sub.only)
        names: dict[str, str] = {}
        for a in p._actions:  # a key's own flag, not its FLAG_ALIASES flag (added after it)
            if a.dest.startswith(CFG_PREFIX):
                names.setdefault(a.dest[len(CFG_PREFIX):], a.option_strings[0])
        p.set_defaults(_subcommand=name, _flag_names=names)
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
