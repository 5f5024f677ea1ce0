"""Recovered students on four domains: which loss generalises (issue 16, "the default loss").

The recovery loss (forward KL, CE, or the 0.5 / 0.5 default) trades closeness to the teacher
against fitting the recovery text (Minitron, arXiv 2407.14679, chose KL alone). A loss chosen
on one text can favour that text's domain, so this evaluates every model given on four texts,
each against the teacher (perplexity, KL(teacher || student), top-1 agreement):

* ``wikitext``: the first ``--tokens`` tokens of WikiText-2 test (never trained on);
* ``corpus``: the rows of ``../shared/data/corpus`` that ``recover`` holds out (its seeded
  shuffle's first rows, ``--corpus-tokens``), the recovery text's own domain;
* ``generated``: teacher-generated text that no run trained on (``--generated``: a JSONL of
  ``minicompress generate`` written with another seed than the training set's);
* ``docstrings``: a domain that neither the corpus (news, Brown, speeches, forum text) nor
  WikiText-2 covers: the docstrings of this Python's standard library (module, class and
  function docstrings of at least ``--min-docstring-chars``, shuffled with seed 0, tests and
  IDLE left out), technical English the same on every machine with the same Python.

Windows of ``--seq-len`` (512), non-overlapping; bf16 autocast where the CPU has native bf16
(as ``recover`` evaluates). Prints a rich table, writes ``benchmarks/out/loss_domains.json``.

Run::

    minicompress generate --teacher smollm2-135m --tokens 16384 --seq-len 512 --seed 1 \\
        --output ~/.cache/minicompress/runs/gen/heldout-seed1
    python benchmarks/loss_domains.py --generated ~/.cache/minicompress/runs/gen/heldout-seed1/text.jsonl \\
        --models kl+ce=<folder>,kl=<folder>
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from common import DATA, OUT, make_console, print_table, run_record, write_json

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
             "__pycache__"}


def stdlib_docstrings(min_chars: int = 200) -> str:
    """The docstrings of the standard library of this Python, joined by blank lines.

    Args:
        min_chars: shorter docstrings (one-liners) are left out.

    Returns:
        The docstrings in a seeded shuffle (the first tokens sample the whole library); the
        same text for the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars:
                    parts.append(doc)
    random.Random(0).shuffle(parts)  # the first tokens sample the whole library, not its first modules
    return "\n\n".join(parts)


def docstrings_file(work: str | Path, min_chars: int = 200) -> Path:
    """The :func:`stdlib_docstrings` text in ``work`` (written once per Python version and ``min_chars``)."""
    work = Path(work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    docs = work / f"stdlib-docstrings-py{sys.version_info.major}.{sys.version_info.minor}-min{min_chars}.txt"
    if not docs.is_file():
        docs.write_text(stdlib_docstrings(min_chars), encoding="utf-8")
    return docs


@dataclass(frozen=True)
class DomainTexts:
    """Where the four domains come from and how much of each is scored.

    Attributes:
        wikitext: WikiText-2 test (a text file, read as one document).
        data: the recovery corpus (its held-out rows are the ``corpus`` domain).
        generated: teacher-generated text (JSONL of ``minicompress generate``); None leaves it out.
        docstrings: the :func:`docstrings_file` text.
        tokens: tokens of WikiText-2, generated text and docstrings.
        corpus_tokens: held-out corpus tokens (within ``recover``'s ``eval_tokens``).
        seed: the recovery runs' data seed (which rows are held out).
        seq_len: window length.
    """

    wikitext: str
    data: str
    generated: str | None
    docstrings: str
    tokens: int = 16384
    corpus_tokens: int = 8192
    seed: int = 0
    seq_len: int = 512


def domain_windows(tokenizer, texts: DomainTexts) -> dict:
    """``{domain: [(ids [L], scored tokens), ...]}``: non-overlapping windows of the four texts
    (``wikitext``, ``corpus``, ``generated`` when given, ``docstrings``), in this order."""
    from recover_quality import corpus_held_out_windows, wikitext_windows

    domains = {"wikitext": wikitext_windows(texts.wikitext, tokenizer, texts.tokens, texts.seq_len),
               "corpus": corpus_held_out_windows(texts.data, tokenizer, texts.corpus_tokens, texts.seed,
                                                 texts.seq_len)}
    if texts.generated:
        domains["generated"] = wikitext_windows(str(Path(texts.generated).expanduser()), tokenizer, texts.tokens,
                                                texts.seq_len)
    domains["docstrings"] = wikitext_windows(texts.docstrings, tokenizer, texts.tokens, texts.seq_len)
    return domains


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="label=folder,... (recovered students)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--data", default=str(DATA / "corpus"), help="the recovery corpus (its held-out rows)")
    p.add_argument("--generated", default=None, help="held-out generated text (JSONL); left out if not given")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of WikiText-2, generated text and docstrings")
    p.add_argument("--corpus-tokens", type=int, default=8192, help="held-out corpus tokens (recover's hold-out)")
    p.add_argument("--min-docstring-chars", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="the recovery runs' data seed (their held-out rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(OUT / "loss_domains"), help="folder for the docstring text")
    p.add_argument("--output", default=str(OUT / "loss_domains.json"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from peers import eval_teacher
    from recover_quality import evaluate_wikitext

    from minicompress.models import load_model

    torch.set_num_threads(args.threads)
    models = dict(item.split("=", 1) for item in args.models.split(","))
    for label, folder in models.items():
        if not Path(folder).expanduser().is_dir():
            sys.exit(f"error: --models {label}={folder}: no such folder")
    if args.generated and not Path(args.generated).expanduser().is_file():
        sys.exit(f"error: --generated {args.generated}: no such file")
    docs = docstrings_file(args.work, args.min_docstring_chars)
    console = make_console()
    teacher, tokenizer = eval_teacher(args.teacher)
    domains = domain_windows(tokenizer, DomainTexts(wikitext=args.wikitext, data=args.data, generated=args.generated,
                                                    docstrings=str(docs), tokens=args.tokens,
                                                    corpus_tokens=args.corpus_tokens, seed=args.seed,
                                                    seq_len=args.seq_len))
    teacher_ppl = {name: evaluate_wikitext(teacher, windows, None)["perplexity"] for name, windows in domains.items()}

    results = {}
    for label, folder in models.items():
        t0 = time.perf_counter()
        model, _ = load_model(str(Path(folder).expanduser()))
        results[label] = {"model": folder, **{name: evaluate_wikitext(model, windows, teacher)
                                              for name, windows in domains.items()}}
        console.log(f"{label}: {time.perf_counter() - t0:.0f} s")
        del model

    columns = ["model"] + [f"{d} {m}" for d in domains for m in ("ppl", "KL")]
    rows = [["teacher"] + [x for d in domains for x in (f"{teacher_ppl[d]:.2f}", "")]]
    rows += [[label] + [x for d in domains for x in (f"{r[d]['perplexity']:.1f}", f"{r[d]['kl_to_teacher']:.3f}")]
             for label, r in results.items()]
    print_table("Recovered students on four domains (ppl, KL(teacher || student))", columns, rows, console=console)
    record = run_record(domains={d: {"windows": len(w), "tokens": sum(n for _, n in w)} for d, w in domains.items()},
                        docstrings_file=str(docs), generated=args.generated, teacher_perplexity=teacher_ppl,
                        results=results)
    write_json(args.output, record)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
