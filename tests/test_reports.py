"""Tests for minicompress.reports: the commands' tables, whole off a terminal."""

from __future__ import annotations

import io

from minicompress import reports
from minicompress.reports import new_console, render_run, render_table

LONG = "stage-1-prune-to-half-then-distil-for-a-million-tokens"


def run_report() -> dict:
    row = {"model": LONG, "parameters": 67_500_000, "ratio": 0.5018, "size_on_disk_bytes": 270_000_000,
           "perplexity": 31.25, "kl_to_original": 0.4321, "top1_agreement": 0.6789, "arc_easy/acc": 0.4567,
           "hellaswag/acc": 0.3456, "decode_tokens_per_s": 123.4, "wall_time_s": 3456.7, "tokens": 1_000_000}
    original = {**row, "model": "original", "tokens": 0}
    return {"columns": ["model", "arc_easy/acc", "hellaswag/acc"], "rows": [original, row],
            "eval_data": {"source": "/data/wikitext-2-raw-v1/wiki.test.raw"}}


def test_off_a_terminal_the_run_table_is_printed_whole(capsys):
    render_run("configs/a-progressive-run-with-a-long-name.yaml", run_report())
    out = capsys.readouterr().out
    assert LONG in out and "…" not in out
    for header in ("model", "params", "ratio", "size", "ppl", "KL", "top-1", "arc_easy", "hellaswag",
                   "decode tok/s", "wall s", "tokens"):
        assert header in out, header
    assert "configs/a-progressive-run-with-a-long-name.yaml on /data/wikitext-2-raw-v1/wiki.test.raw" in out
    lines = out.splitlines()
    assert max(map(len, lines)) > 100  # wider than the old fixed width, not cut to it
    assert sum(LONG in line for line in lines) == 1  # one row per line, nothing wrapped


def test_a_wide_table_is_whole_off_a_terminal_and_fits_a_terminal(monkeypatch, capsys):
    rows = [{f"column number {i}": f"value-{i}-" + "x" * 20 for i in range(12)}]
    render_table("twelve columns", rows)
    out = capsys.readouterr().out
    assert all(f"column number {i}" in out and f"value-{i}-{'x' * 20}" in out for i in range(12))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.setattr(reports, "_terminal_width", lambda: 120)
    assert new_console().width == 120
    monkeypatch.setattr(reports, "_terminal_width", lambda: 60)
    assert new_console().width == 100  # at least 100 columns, as before
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert new_console().width == reports.OFF_TERMINAL_WIDTH


def test_dry_run_notes_are_whole_lines(capsys):
    reports.render_lines(["note " + "word " * 60])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("note word")


def test_only_the_command_line_prints():
    import ast
    from pathlib import Path

    package = Path(reports.__file__).parent
    printing = sorted({str(path.relative_to(package)) for path in package.rglob("*.py")
                       for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"})
    assert printing == ["cli.py"]  # reports.py writes through rich consoles, the rest logs
