"""What the ``minicompress`` commands write: their tables, JSON results and log lines.

Every command's result is shown by one renderer here (:func:`render_info`,
:func:`render_eval`, :func:`render_prune`, :func:`render_run` ...), built on
:func:`render_table`. On a terminal a table fits the window (at least 100 columns); off
a terminal (``> file``, ``| tee``, CI logs) it is printed whole, at its natural width,
so long stage names and the right-hand columns are never cut.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("minicompress")

#: Columns of a console that is not a terminal: wide enough that nothing is wrapped or cut.
OFF_TERMINAL_WIDTH = 100_000


def _isatty(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def new_console(stderr: bool = False, on_terminal: bool | None = None):
    """A rich console on stdout (or stderr): the window's width on a terminal (at least
    100), else :data:`OFF_TERMINAL_WIDTH`, so a table or line is printed whole.

    Args:
        stderr: write to stderr instead of stdout.
        on_terminal: whether to size it as for a terminal (None: whether the stream is one).
    """
    from rich.console import Console

    if on_terminal is None:
        on_terminal = _isatty(sys.stderr if stderr else sys.stdout)
    width = max(100, _terminal_width()) if on_terminal else OFF_TERMINAL_WIDTH
    return Console(stderr=stderr, soft_wrap=False, width=width)


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
        console: a ``rich.console.Console`` (default: :func:`new_console`, stdout).
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
    (console or new_console()).print(table)


def render_lines(lines: list[str]) -> None:
    """Print plain lines (no rich markup) to stdout, whole off a terminal."""
    out = new_console()
    for line in lines:
        out.print(line, markup=False)


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


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:,.2f} GiB"


def count(n: int) -> str:
    """``134,515,008`` as ``134.5M``, ``94,000,000,000`` as ``94B``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.4g}{unit}"
    return str(n)


def scalars(report: dict) -> dict:
    """The entries of a report that fit one table cell (no dicts or lists)."""
    return {k: v for k, v in report.items() if not isinstance(v, (dict, list))}


# ----------------------------------------------------------------------------------------
# Logs


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

        handler = RichHandler(console=new_console(stderr=True, on_terminal=True), show_path=False, show_time=False,
                              markup=False, rich_tracebacks=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler._minicompress = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# ----------------------------------------------------------------------------------------
# One renderer per command


def render_info(model: str, result: dict) -> None:
    """``info``: the architecture, then the closed-form parameter breakdown."""
    render_table(f"{model}: architecture", dict(result["architecture"]))
    rows = [{"component": r["component"], "parameters": r["count"], "% of total": f"{r['percent']:.2f}"}
            for r in result["parameters"]]
    if "counted_total" in result:
        rows.append({"component": "counted (unique tensors)", "parameters": result["counted_total"],
                     "% of total": "match" if result["counted_matches_closed_form"] else "MISMATCH"})
    render_table(f"{model}: parameters (closed form; tied lm_head counted once)", rows)


#: eval's draft results shown in its table (all of them go to the JSON)
DRAFT_SHOWN = ("acceptance_rate", "draft_accepted_per_forward", "draft_tokens_per_forward", "draft_teacher_forwards",
               "draft_plain_teacher_forwards", "draft_plain_tokens_per_s", "draft_assisted_tokens_per_s",
               "draft_speedup", "draft_outputs_identical")


def task_rows(tasks: dict[str, dict]) -> list[dict]:
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


def compare_rows(cfg, results: dict) -> list[dict]:
    """``--compare``: one row per model (``--model`` first), size and speed as ratios to it."""
    rows = []
    for entry in [{"model": cfg.model.source, **results}, *results["compare"]]:
        row = {"model": Path(entry["model"]).name or entry["model"], "parameters": f"{entry.get('parameters', 0):,}",
               "size on disk": mib(entry.get("size_on_disk_bytes")), "perplexity": entry.get("perplexity")}
        if "kl_to_teacher" in entry:
            row["KL to teacher"] = entry["kl_to_teacher"]
        for key, label in (("prefill_tokens_per_s", "prefill tok/s"), ("decode_tokens_per_s", "decode tok/s")):
            if entry.get(key) is not None:
                row[label] = f"{entry[key]:,.1f} ({entry[key] / results[key]:.2f}x)" if results.get(key) else entry[key]
        rows.append(row)
    return rows


def render_eval(cfg, results: dict) -> None:
    """``eval``: the model's numbers, then ``--compare``, task accuracy and the draft test."""
    shown = {key: value for key, value in results.items() if not key.startswith("draft_") and key != "acceptance_rate"}
    for key in ("size_on_disk_bytes", "eval_peak_memory_bytes", "speed_peak_memory_bytes"):
        if key in shown:
            shown[key.replace("_bytes", "")] = mib(shown.pop(key))
    title = f"eval {cfg.model.source} on {cfg.data.source} (seq_len {cfg.data.seq_len}"
    title += f", stride {cfg.stride})" if cfg.stride else ")"
    if cfg.data.source is None:
        title = f"eval {cfg.model.source} (no --data: no perplexity)"
    shown.pop("tasks", None)
    shown.pop("compare", None)
    render_table(title, shown)
    if results.get("compare"):
        render_table(f"side by side on {cfg.data.source} (seq_len {cfg.data.seq_len})", compare_rows(cfg, results))
    if "tasks" in results:
        shots = "each task's default shots" if cfg.num_fewshot is None else f"{cfg.num_fewshot}-shot"
        render_table(f"task accuracy of {cfg.model.source} (lm-evaluation-harness, {shots}"
                     + (f", first {cfg.task_limit} documents per task)" if cfg.task_limit else ")"),
                     task_rows(results["tasks"]))
    if cfg.draft is not None:
        render_table(f"draft {Path(cfg.draft.source).name} for {Path(cfg.model.source).name} (greedy, "
                     f"{results['draft_prompts']} prompts, draft tokens per forward: {cfg.draft_tokens})",
                     {k: results[k] for k in DRAFT_SHOWN})


def render_score(cfg, scores) -> None:
    """``score``: Block Importance (and the loss increase) per layer."""
    bi = scores.block_importance
    rows = []
    for i in range(bi.numel()):
        row = {"layer": i, "block importance": float(bi[i])}
        if scores.layer_loss is not None:
            row["loss increase if dropped"] = float(scores.layer_loss[i])
        rows.append(row)
    render_table(f"layer scores of {cfg.model.source} ({scores.meta['num_samples']} samples x "
                 f"{scores.meta['seq_len']} tokens, {scores.meta['seconds']:.0f}s)", rows)


def render_prune(cfg, report: dict) -> None:
    """``prune``: original against pruned shape, then the architecture search (if any)."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size")
    rows = [{"": k, "original": report["original"][k], "pruned": report["pruned"][k]} for k in keys]
    rows.append({"": "parameters", "original": report["parameters"]["original"],
                 "pruned": report["parameters"]["pruned"]})
    rows.append({"": "ratio", "original": 1.0, "pruned": report["parameters"]["ratio"]})
    render_table(f"pruned {cfg.model.source} -> {cfg.output}", rows)
    if report.get("search"):
        render_search(report["search"])


def render_search(table: list[dict]) -> None:
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


def render_recover(cfg, report: dict) -> None:
    """``recover``: the run's numbers and the held-out metrics before and after."""
    shown = scalars(report)
    for phase in ("before", "after"):
        for key, value in (report.get(phase) or {}).items():
            if not isinstance(value, (dict, list)):
                shown[f"{phase} {key}"] = value
    render_table(f"recovered {cfg.student.source} -> {cfg.output}", shown)


def render_correct(cfg, report: dict) -> None:
    """``correct``: the fine-tune's numbers and the teacher's held-out perplexity before and after."""
    before, after = report.get("before") or {}, report.get("after") or {}
    render_table(f"corrected {cfg.teacher.source} -> {cfg.output}", {
        "tokens": report["tokens"], "steps": report["steps"], "lr": cfg.lr, "seconds": report["seconds"],
        "tokens/s": report["tokens_per_s"], "final train loss": report["final_loss"],
        "held-out perplexity before": before.get("perplexity"), "held-out perplexity after": after.get("perplexity"),
        "held-out tokens": before.get("tokens"), "resumed from step": report["resumed_from_step"]})


def render_quantize(cfg, report: dict) -> None:
    """``quantize``: scheme, what was quantized, size on disk before and after."""
    group = report["group_size"]
    render_table(f"quantized {cfg.model.source} -> {cfg.output}", {
        "scheme": report["scheme"], "group size": "per output channel" if group is None else group,
        "quantized linears": report["quantized_linears"], "quantized weights": report["quantized_parameters"],
        "size on disk before": mib(report["size_before_bytes"]), "size on disk after": mib(report["size_after_bytes"]),
        "size ratio": report["size_ratio"], "seconds": report["seconds"]})


def _shape_cell(shape: dict) -> str:
    return "/".join(str(shape[k]) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                            "intermediate_size", "num_hidden_layers"))


def render_dry_run(config_path: str, cfg, plan: dict, ranks: int) -> None:
    """``run --dry-run``: each stage's shape, parameters, token budget and memory, then notes."""
    original = plan["original"]
    rows = [{"stage": 0, "name": "original", "h/q/kv/ffn/L": _shape_cell(original),
             "params": count(original["parameters"]["total"]), "ratio": 1.0, "tokens": "", "teacher": "", "memory": ""}]
    for r in plan["stages"]:
        rows.append({"stage": r["stage"], "name": r["name"],
                     "h/q/kv/ffn/L": "search" if r["hidden_size"] is None else _shape_cell(r),
                     "params": count(r["params"]) if r["params"] is not None else "run time",
                     "ratio": r["ratio"] if r["ratio"] is not None else "run time",
                     "tokens": count(r["tokens"]) if r["tokens"] else "0 (prune only)",
                     "teacher": r["teacher"] if r["tokens"] else "-",
                     "memory": gib(r["memory_bytes"])})
    per = f", memory per rank of {ranks}" if ranks > 1 else ""
    render_table(f"dry run of {config_path}: {cfg.model.source} in {len(plan['stages'])} stage(s), "
                 f"no weights loaded{per}", rows)
    notes = [f"stage {r['stage']} ({r['name']}): {r['note']}" for r in plan["stages"] if r["note"]]
    if plan.get("generate"):
        gen = plan["generate"]
        starts = f"the first tokens of {gen['prompts']}" if gen["prompts"] else "single start tokens (LLM-QAT)"
        notes.insert(0, f"data-free: the original first writes {gen['tokens']:,} tokens in rows of "
                        f"{gen['seq_len']} from {starts} into OUTPUT/{gen['output']}; every stage calibrates "
                        "on that text, and stages taught by the original recover from its sparse targets")
    if plan.get("correct"):
        corr = plan["correct"]
        memory = f", {gib(corr['memory_bytes'])} in one process" if corr["memory_bytes"] else ""
        notes.insert(0, f"teacher correction: the original is first fine-tuned on {corr['tokens']:,} tokens of the "
                        f"text (cross-entropy, lr {corr['lr']:g}{memory}) into OUTPUT/{corr['output']}; stage 1 "
                        "prunes it and every stage taught by the original distils from it")
    if ranks > 1:
        notes.append(f"memory: per rank of {ranks} (torchrun + FSDP2) for the recovery: sharded student "
                     "weights + grads + AdamW and teacher weights, gathered layers, root groups, activations "
                     "(docs/progressive.md: Large models); prune whole checkpoints with prune --streaming")
    else:
        notes.append("memory: one process; recovery = weights + grads + AdamW moments of the student (16 bytes "
                     "per parameter in float32) + teacher weights + activations, pruning = input + pruned "
                     "weights (docs/progressive.md: Progressive runs)")
    render_lines(notes)


def render_run(config_path: str, report: dict) -> None:
    """``run``: the original and every stage side by side (the report's table)."""
    from .recipes.run import REPORT_COLUMNS

    shown = []
    task_columns = [c for c in report["columns"] if c.endswith("/acc") and c not in REPORT_COLUMNS]
    for row in report["rows"]:
        cells = {"model": row["model"], "params": count(row["parameters"]), "ratio": row["ratio"],
                 "size": mib(row["size_on_disk_bytes"]), "ppl": row["perplexity"], "KL": row["kl_to_original"],
                 "top-1": row["top1_agreement"],
                 **{c.removesuffix("/acc"): row.get(c) for c in task_columns},
                 "decode tok/s": row["decode_tokens_per_s"],
                 "wall s": row["wall_time_s"], "tokens": count(row["tokens"]) if row["tokens"] else "-"}
        shown.append({k: "-" if v is None else v for k, v in cells.items()})
    where = f" on {report['eval_data']['source']}" if report.get("eval_data") else " (no eval_data: no perplexity)"
    accuracy = "; task columns: lm-eval acc" if task_columns else ""
    render_table(f"run {config_path}{where}; KL / top-1 against the original{accuracy}", shown)
