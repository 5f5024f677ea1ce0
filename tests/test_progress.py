"""Progress off a terminal: plain log lines at an interval and at the end, never a silent bar."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minicompress import progress

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<desc>.+?) (?P<done>[\d,.]+)/(?P<total>[\d,.]+) (?P<unit>\S+) \((?P<pct>[\d.]+)%\) "
                  r"(?P<rate>[\d,.?]+) (?P=unit)/s elapsed (?P<elapsed>\d+:\d\d) "
                  r"ETA (?P<eta>\d+:\d\d|\?)(?P<extra>.*)$")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_bar(monkeypatch, caplog):
    """Progress on, stderr not a terminal, a fake clock and a 10 s interval."""
    clock = FakeClock()
    monkeypatch.setenv("MINICOMPRESS_PROGRESS", "1")
    monkeypatch.setenv("MINICOMPRESS_PROGRESS_INTERVAL", "10")
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "clock", clock)
    caplog.set_level(logging.INFO, logger="minicompress.progress")
    logger = logging.getLogger("minicompress")
    monkeypatch.setattr(logger, "propagate", True)  # a CLI test may have set up its own handler
    return clock, caplog


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "minicompress.progress" and r.levelno == logging.INFO]


def test_off_a_terminal_progress_is_logged_at_an_interval_and_at_the_end(log_bar):
    clock, caplog = log_bar
    with progress.progress_bar("score", 100, unit="samples") as bar:
        clock.now += 4
        bar.advance(20)
        assert _lines(caplog) == []  # not yet 10 s
        clock.now += 6
        bar.advance(20, loss=3.14159)
        clock.now += 5
        bar.advance(10)
        clock.now += 5
        bar.update(description="score pass 2")
    lines = _lines(caplog)
    assert len(lines) == 3, lines
    first, second, last = (LINE.match(line) for line in lines)
    assert first and second and last, lines
    assert (first["desc"], first["done"], first["total"], first["unit"], first["pct"]) == \
        ("score", "40", "100", "samples", "40.0")
    assert first["rate"] == "4.00" and first["elapsed"] == "00:10" and first["eta"] == "00:15"
    assert first["extra"] == " loss 3.142"
    assert second["desc"] == "score pass 2" and second["done"] == "50" and second["elapsed"] == "00:20"
    assert second["rate"] == "2.00"  # 10 samples completed in the 5 s after the previous line's work
    # the last line: the whole run's rate, logged once at the end
    assert last["done"] == "50" and last["rate"] == "2.50" and last["elapsed"] == "00:20"


def test_the_rate_is_over_completed_work_not_the_ticks_between_steps(log_bar):
    """recover advances once per optimizer step: lines between two steps (heartbeats, other
    updates) reported a rate that sank and rose (137, 68, 86, 137 tok/s on one run) with the
    unfinished step's time and none of its tokens. Every line now shows the steady rate, and
    a resumed run's earlier tokens are in no rate."""
    clock, caplog = log_bar
    step = 4096
    with progress.progress_bar("recover", 4 * step, unit="tok", completed=step) as bar:  # one step resumed
        for t in range(5, 51, 5):  # a tick every 5 s, a step every 15 s
            clock.now += 5
            bar.advance(step) if t % 15 == 0 else bar.update()
    lines = [LINE.match(line) for line in _lines(caplog)]
    assert all(lines) and [m["elapsed"] for m in lines] == ["00:10", "00:20", "00:30", "00:40", "00:50", "00:50"]
    assert lines[0]["done"] == "4,096" and lines[0]["rate"] == "?"  # nothing done in this run yet
    assert [m["rate"] for m in lines[1:5]] == ["273"] * 4  # 4,096 tokens / 15 s, between steps too
    assert lines[1]["eta"] == "00:30"  # two steps of 15 s left
    assert lines[5]["rate"] == "246"  # final: 3 steps' tokens over the 50 s of this run


def test_interval_zero_logs_every_update_and_unknown_totals(log_bar, monkeypatch):
    clock, caplog = log_bar
    monkeypatch.setenv("MINICOMPRESS_PROGRESS_INTERVAL", "0")
    with progress.progress_bar("search", None, unit="cand") as bar:
        bar.update(total=3)
        clock.now += 2
        bar.advance(1)
    lines = _lines(caplog)
    assert len(lines) == 3 and all(LINE.match(line) for line in lines), lines
    assert lines[1].startswith("search 1/3 cand (33.3%) 0.50 cand/s elapsed 00:02 ETA 00:04")
    caplog.clear()
    with progress.progress_bar("tokenising", None, unit="B") as bar:
        bar.advance(5000)
    assert _lines(caplog)[-1].startswith("tokenising 5,000 B ")


def test_interval_from_the_environment(monkeypatch):
    for value, expected in (("", 30.0), ("2.5", 2.5), ("0", 0.0), ("-1", 30.0), ("x", 30.0)):
        monkeypatch.setenv("MINICOMPRESS_PROGRESS_INTERVAL", value)
        assert progress.log_interval() == expected


def test_disabled_progress_logs_nothing(log_bar, monkeypatch):
    clock, caplog = log_bar
    monkeypatch.setenv("MINICOMPRESS_PROGRESS", "0")
    with progress.progress_bar("score", 10) as bar:
        clock.now += 60
        bar.advance(10)
    assert _lines(caplog) == []


def test_a_heartbeat_logs_while_a_long_step_runs(monkeypatch, caplog):
    """No update for longer than the interval (one slow step): the line still comes."""
    import time

    monkeypatch.setenv("MINICOMPRESS_PROGRESS", "1")
    monkeypatch.setenv("MINICOMPRESS_PROGRESS_INTERVAL", "0.05")
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(logging.getLogger("minicompress"), "propagate", True)
    caplog.set_level(logging.INFO, logger="minicompress.progress")
    with progress.progress_bar("recover", 10, unit="tok"):
        time.sleep(0.5)
    assert len(_lines(caplog)) >= 2  # heartbeats, then the final line


def test_cli_score_with_stderr_to_a_pipe_logs_plain_progress_lines(tmp_path, tiny_model_dir, text_corpus):
    """``minicompress score ... 2> file``: progress lines reach stderr, one per line, no bar escapes;
    the layer-loss score's forwards are counted too (the bar does not sit at 100% while they run)."""
    model_dir = tiny_model_dir("llama")
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    env = {**os.environ, "MINICOMPRESS_PROGRESS": "1", "MINICOMPRESS_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FORCE_COLOR", None)
    result = subprocess.run([sys.executable, "-m", "minicompress", "score", "--model", str(model_dir), "--data",
                             str(text_corpus), "--seq-len", "16", "--num-samples", "8", "--batch-size", "2",
                             "--loss-samples", "2", "--output", str(tmp_path / "scores")],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "\x1b" not in err and "\r" not in err, repr(err[:500])  # no cursor moves, colours or redraws
    total = 8 + (layers + 1) * 2  # the activation pass, then the full model and each layer skipped
    lines = [line for line in err.splitlines() if " score" in f" {line}" and " seq/s elapsed " in line]
    assert lines, err
    assert all(re.search(rf"INFO score( \(layer loss\))? \d+/{total} seq \([\d.]+%\) .* seq/s elapsed \d\d:\d\d ETA",
                         line) for line in lines), lines
    assert any("score 8/" in line for line in lines)  # the activation pass's end, before the layer loss
    assert f"score (layer loss) {total}/{total} seq (100.0%)" in lines[-1]
