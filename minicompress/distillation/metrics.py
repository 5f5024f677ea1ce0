"""The metrics of a training run: ``metrics.jsonl`` records and their ``curves.png``."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"



def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def held_out_kl_key(records: list[dict]) -> str | None:
    """The held-out KL key the evaluation records carry: against the live teacher first,
    else against a sampled or top-k cache (None without any)."""
    return next((k for k in ("eval_kl_to_teacher", "eval_sampled_kl_to_teacher", "eval_topk_kl_to_teacher")
                 if any(k in r for r in records)), None)


def plot_curves(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Plot training loss and held-out perplexity / KL against tokens into a PNG.

    Args:
        records: ``metrics.jsonl`` records (training records have ``loss``; evaluation
            records have ``eval_*`` keys).
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_perplexity" in r]
    kl_key = held_out_kl_key(evals)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if train:
        x = [r["tokens"] for r in train]
        ax.plot(x, [r["loss"] for r in train], label="loss")
        for key in ("kl", "ce"):
            if any(r.get(key) for r in train):
                ax.plot(x, [r[key] for r in train], label=key, alpha=0.7)
        ax.legend()
    ax.set(title="training loss", xlabel="tokens")
    ax = axes[1]
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["eval_perplexity"] for r in evals], marker="o")
        ax.set_yscale("log")
    ax.set(title="held-out perplexity", xlabel="tokens")
    ax = axes[2]
    if kl_key:
        pts = [r for r in evals if kl_key in r]
        ax.plot([r["tokens"] for r in pts], [r[kl_key] for r in pts], marker="o")
    ax.set(title="held-out KL to teacher" + {"eval_topk_kl_to_teacher": " (top-k)",
                                             "eval_sampled_kl_to_teacher": " (sampled)"}.get(kl_key, ""),
           xlabel="tokens")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def append_metrics(path: Path, record: dict) -> None:
    """Append one record as a JSON line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
