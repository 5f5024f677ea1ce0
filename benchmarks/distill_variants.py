"""Issue 29: distillation variants of one student at equal wall time, on four texts and in its own words.

Which teacher signal recovers a pruned student best when every way gets the same CPU time?
Generating text (on-policy distillation: GKD, Agarwal et al., ICLR 2024, arXiv 2306.13649) and
a second teacher (a corrected teacher, Minitron's "teacher correction", Sreenivas et al., arXiv
2408.11796) cost time per step, so equal tokens would flatter them. Each variant is a list of
extra ``minicompress recover`` flags (``--variant LABEL=FLAGS``, or a ``--preset``); every run
is a plain ``python -m minicompress recover`` child process (the CLI, so the flags of
``--teacher A --teacher B --teacher-weights``, ``--on-policy``, ``--divergence`` and
``--jsd-beta`` are used exactly as a user types them), resumable: run the same command again
and finished runs are skipped, a killed one resumes from its checkpoint.

**Equal wall time, by probing.** Before its run, each variant is probed: ``recover`` runs
``--probe-steps`` optimizer steps (default 4) with the variant's flags, and its seconds per
step are the mean of ``metrics.jsonl``'s ``elapsed_s`` increments after the first step (which
holds compilation and warm-up). ``elapsed_s`` is ``recover``'s training clock: data,
generation, forwards, backward and update, not evaluation or checkpoints. The run then gets the
whole steps that fit ``--budget`` seconds, ``tokens = floor(budget / s_step) *
global_batch_tokens``, so every variant runs a complete schedule (warmup, cosine to 0) in
the same time. ``recover --on-policy L`` has the student write the same share L of every
step's sequences, so every step costs about the same and the variant is probed as it runs
(batched decoding is not linear in the rows generated, so no mix of an off- and an
on-policy probe would do). Probes are cached (``<workdir>/probes.json``). After the run,
the seconds it really trained are reported next to the budget, and the held-out perplexity of every run is also read at the
common time ``T* = min(trained seconds)`` from its curve (``--eval-every``: about
``--curve-points`` evaluations per run, linear interpolation between them), which
cancels the probes' error. ``--common`` flags go to every run and probe (default
``--compile true``: compiled decoder layers in every run, long or short, so probes and runs
go at the same speed; ``recover``'s ``auto`` compiles only from 262,144 tokens on).

**Teacher correction.** ``{corrected:N}`` in a variant's flags is the teacher fine-tuned on
the corpus for N tokens by ``python -m minicompress correct --teacher T --data D --tokens N
--output DIR`` with the runs' ``--seed`` and ``--eval-tokens`` (so it never trains on the
held-out rows evaluated), built once under ``--workdir``, its wall seconds recorded (loading
and its own evaluations included). With ``--charge-correction`` those seconds come out of
that variant's budget (one student per correction; ``T*`` still compares training seconds);
without, the correction is free (amortised over many students, as Minitron does). The
corrected teachers are evaluated too (against the original). The weight sweep's pick is the
``both`` row of lowest held-out corpus KL to the original teacher (a pick on a reported
text: read the other three texts for the unbiased comparison).

**Evaluation** (the same code for ``benchmarks/peers_gkd.py``'s TRL rows): every result, the
pruned start and the corrected teachers on four texts, ``benchmarks/loss_domains.py``'s
(``wikitext``: the first ``--domain-tokens`` of WikiText-2 test; ``corpus``: the rows ``recover``
holds out, ``--corpus-tokens``; ``generated``: teacher text of ``minicompress generate
--seed 1``, which no run trains on, built once unless ``--generated`` is given;
``docstrings``: the standard library's docstrings): perplexity, KL(original teacher ||
student) and top-1 agreement with the ORIGINAL teacher, whatever the run trained against.
Then the teacher's judgement of the student's own text: from ``--prompts`` held-out corpus
rows (their first ``--prompt-tokens`` tokens; never WikiText-2) the student samples
``--new-tokens`` tokens at temperature 1 (no top-k / top-p, seeded) with minicompress' KV-cache
sampler (:func:`minicompress.distillation.sampling.sample_batch`), and the original teacher
scores them: its NLL per generated token (lower: the teacher finds the student's text more
likely). Repetitive text is likely text too, so the share of distinct bigrams among the
generated tokens is reported beside it; the teacher's own samples give the reference row.

Prints rich tables, writes ``benchmarks/results/distill_variants-<tag>.json`` and a PNG of
held-out perplexity (and KL to each run's own teacher) against trained seconds.

Run (issue 29's must-show, 2-core Zen 4)::

    python benchmarks/distill_variants.py --preset correction --correction-tokens 65536,262144 \\
        --budget 1800 --tag correction
    python benchmarks/distill_variants.py --preset onpolicy --budget 1800 --tag onpolicy
    python benchmarks/distill_variants.py --variant base= --variant "ce=--kl-weight 0 --ce-weight 1" --budget 600

``--tiny`` runs every path on a tiny random Llama and a 60 kB corpus in about a minute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import DATA, ROOT, make_console, print_table, run_record, write_json

WORKDIR = Path("~/.cache/minicompress/runs/distill_variants").expanduser()
STUDENT = "~/.cache/minicompress/runs/qs-pruned"
RESULTS = ROOT / "benchmarks" / "results"
#: the original teacher in a variant's flags
TEACHER = "{teacher}"


# ---------------------------------------------------------------------------------------
# variants and their flags


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"label=--flag value ..."`` -> ``("label", ["--flag", "value", ...])`` (shell-quoted flags)."""
    label, sep, flags = text.partition("=")
    if not sep or not label or any(c in label for c in "/ "):
        raise ValueError(f"--variant {text!r}: expected LABEL=FLAGS (a label without spaces or '/')")
    return label, shlex.split(flags)


def short_tokens(n: int) -> str:
    """65536 -> ``64Ki``, 1048576 -> ``1Mi``, 64000 -> ``64k``, 1000000 -> ``1M``."""
    for div, unit in ((2**20, "Mi"), (10**6, "M"), (2**10, "Ki"), (10**3, "k")):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def preset_variants(preset: str, args) -> dict[str, list[str]]:
    """The variants of a preset: ``correction`` (original teacher, each corrected teacher, both
    at each ``--teacher-weights`` share of the original, with the most-corrected teacher) or
    ``onpolicy`` (every ``--lambdas`` value with forward KL and with JSD(``--jsd-beta``))."""
    if preset == "correction":
        if not args.correction_tokens:
            raise ValueError("--preset correction needs --correction-tokens N[,N...]")
        out: dict[str, list[str]] = {"orig": []}
        for n in args.correction_tokens:
            out[f"corr{short_tokens(n)}"] = ["--teacher", f"{{corrected:{n}}}"]
        top = max(args.correction_tokens)
        for w in args.teacher_weights:
            out[f"both{short_tokens(top)}-w{w:g}"] = ["--teacher", TEACHER, "--teacher", f"{{corrected:{top}}}",
                                                     "--teacher-weights", f"{w:g},{1 - w:g}"]
        return out
    if preset == "onpolicy":
        out = {}
        for div in ("forward", "jsd"):
            for lam in args.lambdas:
                extra = ["--jsd-beta", f"{args.jsd_beta:g}"] if div == "jsd" else []
                out[f"{'fkl' if div == 'forward' else 'jsd'}-l{round(lam * 100)}"] = [
                    "--on-policy", f"{lam:g}", "--divergence", div, *extra]
        return out
    raise ValueError(f"--preset {preset!r}: choose correction or onpolicy")


def flag_value(flags: list[str], name: str) -> str | None:
    """The last value given to ``name`` (``--x v`` or ``--x=v``) in ``flags``, or None."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def gkd_settings(flags: list[str]) -> dict:
    """GKD's knobs of a variant: ``lmbda`` (``--on-policy``, 0 when absent) and ``beta`` in
    TRL's convention (0 forward KL, 1 reverse KL, ``--jsd-beta`` for JSD), so rows of
    ``peers_gkd.py`` at the same knobs can be put beside it."""
    lam = float(flag_value(flags, "--on-policy") or 0.0)
    div = flag_value(flags, "--divergence") or "forward"
    beta = {"forward": 0.0, "reverse": 1.0}.get(div)
    if div == "jsd":
        beta = float(flag_value(flags, "--jsd-beta") or 0.5)
    return {"lmbda": lam, "divergence": div, "beta": beta}


def seconds_per_step(records: list[dict], skip: int = 1) -> float:
    """Mean training seconds per optimizer step from ``metrics.jsonl`` records, the first
    ``skip`` steps (compilation, warm-up) left out (``elapsed_s`` is cumulative)."""
    train = sorted((r["step"], r["elapsed_s"]) for r in records if r.get("step") and "elapsed_s" in r)
    if len(train) <= skip:
        raise ValueError(f"probe: {len(train)} timed steps, need more than {skip} (raise --probe-steps)")
    (s0, t0), (s1, t1) = train[skip - 1] if skip else (0, 0.0), train[-1]
    return (t1 - t0) / (s1 - s0)


def steps_in_budget(budget_s: float, step_s: float) -> int:
    """Whole optimizer steps of ``step_s`` seconds that fit ``budget_s`` (at least 1)."""
    return max(1, math.floor(budget_s / step_s + 1e-9))


def value_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of ``(x, y)`` points (sorted by x) at ``x``; None outside them."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def resolve_flags(flags: list[str], teacher: str, corrected: dict[int, str]) -> list[str]:
    """``flags`` with ``{teacher}`` the original teacher and ``{corrected:N}`` its corrected folder."""
    out = []
    for flag in flags:
        flag = flag.replace(TEACHER, teacher)
        for n, folder in corrected.items():
            flag = flag.replace(f"{{corrected:{n}}}", folder)
        out.append(flag)
    return out


def corrections_in(flags: list[str]) -> list[int]:
    """The N of every ``{corrected:N}`` in ``flags``."""
    import re

    return sorted({int(m) for flag in flags for m in re.findall(r"\{corrected:(\d+)\}", flag)})


# ---------------------------------------------------------------------------------------
# evaluation: four texts against the original teacher, and the teacher's NLL of the student's text


def teacher_nll(teacher, ids, prompt_len: int, rows_per_forward: int = 4, autocast: str = "auto"):
    """The teacher's NLL of every generated token.

    Args:
        teacher: a ``*ForCausalLM``.
        ids: ``[B, P + G]`` int64 rows, the first ``prompt_len`` (``P``) tokens the prompt.
        prompt_len: ``P``.
        rows_per_forward: rows per teacher forward (``[rows, P + G, V]`` float32 logits).
        autocast: ``auto`` (bf16 where the CPU has it, as ``recover`` evaluates) or ``none``.

    Returns:
        ``[B, G]`` float32 ``-log p_teacher(x_t | x_<t)`` of the generated tokens.
    """
    import torch

    from minicompress.runtime import autocast_context, model_device

    device = model_device(teacher)
    out = []
    with torch.inference_mode():
        for i in range(0, ids.shape[0], rows_per_forward):
            rows = ids[i:i + rows_per_forward].to(device)
            with autocast_context(device, autocast):
                logits = teacher(input_ids=rows).logits
            logp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), dim=-1)
            out.append(-logp.gather(-1, rows[:, prompt_len:, None]).squeeze(-1).cpu())
    return torch.cat(out)


def distinct_bigrams(ids) -> float:
    """Mean over rows of the share of distinct bigrams among a row's bigrams (``ids`` ``[B, G]``)."""
    shares = []
    for row in ids.tolist():
        pairs = list(zip(row, row[1:]))
        shares.append(len(set(pairs)) / max(len(pairs), 1))
    return sum(shares) / max(len(shares), 1)


def free_generation(model, teacher, prompts, new_tokens: int, seed: int, decode=None) -> dict:
    """The teacher's judgement of ``model``'s own continuations of ``prompts`` (``[B, P]``):
    ``new_tokens`` sampled at temperature 1 (no top-k / top-p) by the KV-cache sampler, seeded;
    ``decode`` (token ids -> text), when given, records the first row as ``sample``."""
    import torch

    from minicompress.distillation.sampling import SamplingConfig, sample_batch
    from minicompress.runtime import model_device

    was_training = model.training
    sampling = SamplingConfig(greedy_tokens=0, top_k=0, top_p=1.0, temperature=1.0, samples=1)
    gen = torch.Generator(device=model_device(model)).manual_seed(seed)
    ids = sample_batch(model, prompts, prompts.shape[1] + new_tokens, generator=gen, sampling=sampling,
                       autocast="auto")["input_ids"].cpu()
    model.train(was_training)
    nll = teacher_nll(teacher, ids, prompts.shape[1])
    return {"teacher_nll": float(nll.mean()), "teacher_ppl": float(nll.mean().exp()), "rows": ids.shape[0],
            "new_tokens": new_tokens, "distinct_bigrams": distinct_bigrams(ids[:, prompts.shape[1]:]),
            "sample": decode(ids[0].tolist()) if decode else None}


class EvalSuite:
    """The four texts, the held-out prompts and the original teacher (built once, used for every model).

    Args:
        teacher: the original teacher's source (bf16 where bf16 autocast runs, as ``recover``).
        texts: a :class:`loss_domains.DomainTexts`.
        prompts: ``(rows, prompt tokens, new tokens)`` of the free-generation test.
        seed: its sampling seed.
    """

    def __init__(self, teacher: str, texts, prompts: tuple[int, int, int], seed: int = 0):
        from loss_domains import domain_windows
        from peers import eval_teacher
        from recover_quality import corpus_held_out_windows

        self.teacher, self.tokenizer = eval_teacher(teacher)
        self.domains = domain_windows(self.tokenizer, texts)
        n, prompt_tokens, self.new_tokens = prompts
        rows = corpus_held_out_windows(texts.data, self.tokenizer, n * texts.seq_len, texts.seed, texts.seq_len)
        if len(rows) < n:
            raise SystemExit(f"--prompts {n}: the corpus holds out only {len(rows)} rows")
        import torch

        self.prompts = torch.stack([row[:prompt_tokens] for row, _ in rows[:n]])
        self.seed = seed
        self.signature = {"domains": {d: sum(k for _, k in w) for d, w in self.domains.items()},
                          "prompts": list(self.prompts.shape), "new_tokens": self.new_tokens, "seed": seed}

    def __call__(self, model) -> dict:
        from recover_quality import evaluate_wikitext

        out = {name: evaluate_wikitext(model, windows, self.teacher) for name, windows in self.domains.items()}
        out["free_generation"] = free_generation(model, self.teacher, self.prompts, self.new_tokens, self.seed,
                                                 self.tokenizer.decode)
        return out

    def evaluate_folder(self, folder: str, cache: Path) -> dict:
        """``self(model)`` of an HF folder, cached in ``cache`` (JSON) for the same folder and suite."""
        from minicompress.models import load_model

        stamp = Path(folder, "config.json").stat().st_mtime if Path(folder, "config.json").is_file() else None
        if cache.is_file():
            old = json.loads(cache.read_text())
            if old.get("folder") == folder and old.get("stamp") == stamp and old.get("suite") == self.signature:
                return old["result"]
        model, _ = load_model(folder)
        result = self(model)
        write_json(cache, {"folder": folder, "stamp": stamp, "suite": self.signature, "result": result})
        return result

    def teacher_reference(self, cache: Path) -> dict:
        """The original teacher's perplexity per text and its NLL of its own samples (cached in ``cache``)."""
        from recover_quality import evaluate_wikitext

        if cache.is_file() and json.loads(cache.read_text()).get("suite") == self.signature:
            return json.loads(cache.read_text())["result"]
        out = {name: {"perplexity": evaluate_wikitext(self.teacher, windows, None)["perplexity"]}
               for name, windows in self.domains.items()}
        out["free_generation"] = free_generation(self.teacher, self.teacher, self.prompts, self.new_tokens, self.seed,
                                                 self.tokenizer.decode)
        write_json(cache, {"suite": self.signature, "result": out})
        return out


# ---------------------------------------------------------------------------------------
# running recover / correct / generate through the CLI


def child_env() -> dict:
    return {**os.environ, "MINICOMPRESS_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def run_cli(args: list[str], log: Path, console) -> float:
    """``python -m minicompress ARGS`` with output to ``log``; its wall seconds. Raises on failure."""
    cmd = [sys.executable, "-m", "minicompress", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    console.log("$ " + shlex.join(["minicompress", *args]))
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=child_env()).returncode
    if rc:
        lines = [line for line in log.read_text().strip().splitlines() if not line.startswith("$ ")]
        errors = [line for line in lines if "error" in line.lower()]
        raise RuntimeError(f"minicompress {args[0]} (rc {rc}): {(errors or lines or ['?'])[-1].strip()} (log {log})")
    return time.perf_counter() - t0


def generated_text(args, s: dict, console) -> str:
    """Held-out teacher text: ``--generated``, else ``minicompress generate --seed 1`` of
    ``domain_tokens`` tokens (built once in the work folder; no run trains on it)."""
    if args.generated:
        return str(Path(args.generated).expanduser())
    root = Path(args.workdir).expanduser() / ("tiny" if args.tiny else "")
    folder = root / f"generated-{Path(s['teacher']).name}-seed1-{s['domain_tokens']}-seq{s['seq_len']}"
    if not (folder / "text.jsonl").is_file():
        run_cli(["generate", "--teacher", s["teacher"], "--tokens", str(s["domain_tokens"]), "--seq-len",
                 str(s["seq_len"]), "--seed", "1", "--threads", str(s["threads"]), "--output", str(folder),
                 "--overwrite"], folder.with_name(folder.name + ".log"), console)
    return str(folder / "text.jsonl")


def build_suite(args, s: dict, console) -> EvalSuite:
    """The :class:`EvalSuite` of :func:`settings` ``s`` (this script's and ``peers_gkd.py``'s)."""
    from loss_domains import DomainTexts, docstrings_file

    texts = DomainTexts(wikitext=args.wikitext, data=s["data"], generated=generated_text(args, s, console),
                        docstrings=str(docstrings_file(Path(args.workdir).expanduser() / "docstrings")),
                        tokens=s["domain_tokens"], corpus_tokens=s["corpus_tokens"], seed=s["seed"],
                        seq_len=s["seq_len"])
    return EvalSuite(s["teacher"], texts, s["prompts"], args.seed)


def check_settings(s: dict) -> None:
    """Exit with a one-line error when the student is missing or the evaluation reaches past
    the rows ``recover`` holds out."""
    if not (Path(s["student"]) / "config.json").is_file():
        raise SystemExit(f"error: --student {s['student']}: not a Hugging Face model folder")
    n_prompts = s["prompts"][0]
    held_rows = -(-s["eval_tokens"] // s["seq_len"])
    if n_prompts > held_rows or s["corpus_tokens"] > s["eval_tokens"]:
        raise SystemExit(f"error: --prompts {n_prompts} / --corpus-tokens {s['corpus_tokens']} exceed the "
                         f"{held_rows} rows ({s['eval_tokens']} tokens) recover holds out (--eval-tokens)")


class Runner:
    """Probes, corrections and runs of one benchmark (``--workdir/<tag>``), all cached on disk."""

    def __init__(self, args, s: dict, console):
        self.args, self.s, self.console = args, s, console
        self.base = Path(s["workdir"])
        self.probes_path = self.base / "probes.json"
        self.probes = json.loads(self.probes_path.read_text()) if self.probes_path.is_file() else {}

    def recover_flags(self, flags: list[str], tokens: int, output: Path, eval_tokens: int) -> list[str]:
        s = self.s
        head = ["recover", "--student", s["student"], "--data", s["data"], "--seed", str(s["seed"]),
                "--set", f"seed={s['seed']}", "--tokens", str(tokens), "--eval-tokens", str(eval_tokens),
                "--threads", str(s["threads"]), "-q", "--output", str(output)]
        if "--teacher" not in flags:
            head += ["--teacher", s["teacher"]]
        if flag_value(flags, "--on-policy") is not None:
            head += s["onpolicy_common"]
        return [*head, *s["common"], *flags]

    def global_batch_tokens(self, flags: list[str]) -> int:
        value = flag_value([*self.s["common"], *flags], "--global-batch-tokens")
        if value is not None:
            return int(value)
        from minicompress.config import RecoverConfig, build_config

        return build_config(RecoverConfig, overrides={"loss": {"kl_weight": 0, "ce_weight": 1}}).global_batch_tokens

    def probe(self, flags: list[str]) -> float:
        """Seconds per optimizer step of ``flags`` (one probe run, cached)."""
        key = shlex.join([self.s["student"], self.s["teacher"], *self.s["common"], *flags,
                          f"probe-steps={self.args.probe_steps}", f"threads={self.s['threads']}"])
        if key in self.probes:
            return self.probes[key]["seconds_per_step"]
        name = hashlib.sha1(key.encode()).hexdigest()[:12]
        out = self.base / "probes" / name
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(name + ".partial"), ignore_errors=True)
        tokens = self.args.probe_steps * self.global_batch_tokens(flags)
        # eval_tokens of one row: the probe's pre-training evaluation stays short (the rows trained on
        # differ from the run's, their speed does not)
        cli = self.recover_flags(flags, tokens, out, self.s["seq_len"])
        run_cli([*cli, "--eval-every", "0", "--save-every", "0"], self.base / "probes" / f"{name}.log", self.console)
        from minicompress.distillation.metrics import read_metrics

        step_s = seconds_per_step(read_metrics(out / "metrics.jsonl"))
        self.probes[key] = {"seconds_per_step": step_s, "flags": flags, "date": time.strftime("%Y-%m-%d %H:%M")}
        write_json(self.probes_path, self.probes)
        shutil.rmtree(out, ignore_errors=True)  # the probe's model: a few hundred MB
        self.console.log(f"probe {shlex.join(flags) or '(base)'}: {step_s:.2f} s/step")
        return step_s

    def corrected(self, n: int) -> tuple[str, float]:
        """The teacher corrected for ``n`` tokens (built once) and the seconds it took."""
        folder = self.base / "corrected" / f"{Path(self.s['teacher']).name}-{short_tokens(n)}-seed{self.s['seed']}"
        stamp = folder.with_name(folder.name + ".seconds.json")
        if not (folder / "config.json").is_file():
            # the runs' seed and held-out rows: the corrected teacher never trains on the rows evaluated
            seconds = run_cli(["correct", "--teacher", self.s["teacher"], "--data", self.s["data"], "--tokens", str(n),
                               "--output", str(folder), "--seed", str(self.s["seed"]), "--set", f"seed={self.s['seed']}",
                               "--eval-tokens", str(self.s["eval_tokens"]), "--threads", str(self.s["threads"]),
                               *self.s["correct_common"], *self.args.correct_flags],
                              folder.with_name(folder.name + ".log"), self.console)
            write_json(stamp, {"seconds": seconds, "tokens": n})
        return str(folder), json.loads(stamp.read_text())["seconds"] if stamp.is_file() else None

    def run(self, label: str, flags: list[str], budget_s: float) -> dict:
        """Probe ``flags``, then train the steps that fit ``budget_s`` (skipped when done)."""
        step_s = self.probe(flags)
        steps = steps_in_budget(budget_s, step_s)
        tokens = steps * self.global_batch_tokens(flags)
        output = self.base / "runs" / label
        every = max(steps // self.args.curve_points, 1)
        record = {"label": label, "flags": flags, **gkd_settings(flags), "budget_s": budget_s,
                  "probe_seconds_per_step": step_s, "steps": steps, "tokens": tokens,
                  "output": str(output)}
        done = output / "minicompress.json"
        if done.is_file() and json.loads(done.read_text()).get("recovery", {}).get("tokens_trained", tokens) != tokens:
            self.console.log(f"{label}: {output} holds a run of other tokens; kept (delete it to rerun)")
        if not done.is_file():
            self.console.log(f"{label}: {steps} steps ({tokens:,} tokens) in {budget_s:.0f} s at {step_s:.2f} s/step")
            run_cli([*self.recover_flags(flags, tokens, output, self.s["eval_tokens"]), "--resume",
                     "--eval-every", str(every), "--save-every", str(every)],
                    self.base / "runs" / f"{label}.log", self.console)
        from minicompress.distillation.metrics import read_metrics

        metrics = read_metrics(output / "metrics.jsonl")
        train = [r for r in metrics if "elapsed_s" in r]
        record["trained_s"] = train[-1]["elapsed_s"] if train else None
        record["tokens_trained"] = train[-1]["tokens"] if train else None
        record["curve"] = [{"elapsed_s": r.get("elapsed_s", 0.0), "tokens": r["tokens"],
                            **{k: v for k, v in r.items() if k.startswith("eval_")}}
                           for r in metrics if any(k.startswith("eval_") for k in r)]
        return record


# ---------------------------------------------------------------------------------------
# the record: tables and plot


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def render(record: dict, console) -> None:
    runs = record["runs"]
    print_table(f"Runs at {record['budget_s']:.0f} s each ({record['student_name']}, {record['threads']} threads); "
                f"T* = {fmt(record.get('common_time_s'), '.0f')} s",
                ("variant", "flags", "lambda", "beta", "probe s/step", "steps", "tokens", "trained s",
                 "correction s", "held-out ppl @T*", "held-out ppl end", "note"),
                [(r["label"], shlex.join(r["flags"])[:60], fmt(r.get("lmbda"), "g"), fmt(r.get("beta"), "g"),
                  fmt(r.get("probe_seconds_per_step")), fmt(r.get("steps"), ","), fmt(r.get("tokens_trained"), ","),
                  fmt(r.get("trained_s"), ".0f"), fmt(r.get("correction_s"), ".0f"), fmt(r.get("held_out_at_T")),
                  fmt((r["curve"][-1] if r.get("curve") else {}).get("eval_perplexity")),
                  (r.get("error") or "")[:120])
                 for r in runs.values()], left=("variant", "flags", "note"), console=console)
    domains = list(record["domains"])
    columns = ["model"] + [f"{d} {m}" for d in domains for m in ("ppl", "KL", "top-1")] + \
              ["teacher NLL of samples", "distinct 2-grams"]
    teacher = record["teacher_reference"]
    rows = [["teacher (original)"] + [x for d in domains for x in (fmt(teacher[d]["perplexity"]), "", "")]
            + [fmt(teacher["free_generation"]["teacher_nll"], ".3f"),
               fmt(teacher["free_generation"]["distinct_bigrams"], ".3f")]]

    def row(name: str, ev: dict) -> list:
        gen = ev.get("free_generation") or {}
        return [name] + [x for d in domains for x in (fmt(ev[d]["perplexity"]), fmt(ev[d]["kl_to_teacher"], ".3f"),
                                                        fmt(ev[d].get("top1_agreement"), ".3f"))] + \
            [fmt(gen.get("teacher_nll"), ".3f"), fmt(gen.get("distinct_bigrams"), ".3f")]

    for name, ev in record.get("teachers", {}).items():
        rows.append(row(f"teacher {name}", ev))
    rows.append(row("pruned start", record["start"]))
    best = record.get("best_of_sweep")
    for label, r in runs.items():
        if r.get("eval"):
            rows.append(row(label + (" (best w)" if label == best else ""), r["eval"]))
    print_table("Four texts against the ORIGINAL teacher (ppl, KL(teacher || model), top-1), and the teacher's "
                "NLL per token of the model's own samples (temperature 1, held-out prompts)", columns, rows,
                console=console)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for i, (label, r) in enumerate(record["runs"].items()):
        curve = [p for p in r.get("curve") or [] if "eval_perplexity" in p]
        if not curve:
            continue
        color = f"C{i % 10}"
        axes[0].plot([p["elapsed_s"] for p in curve], [p["eval_perplexity"] for p in curve], marker="o", color=color,
                     label=f"{label} ({(r.get('tokens_trained') or 0):,} tok)")
        kl = [p for p in curve if "eval_kl_to_teacher" in p]
        axes[1].plot([p["elapsed_s"] for p in kl], [p["eval_kl_to_teacher"] for p in kl], marker="o", color=color,
                     label=label)
    for ax in axes:
        ax.axvline(record["budget_s"], color="gray", ls=":", lw=1, label="budget")
        if record.get("common_time_s"):
            ax.axvline(record["common_time_s"], color="k", ls="--", lw=1, label="T*")
        ax.set(xlabel="trained seconds (recover's elapsed_s: generation included, evaluation not)", yscale="log")
        ax.legend(fontsize=7)
    axes[0].set(title="held-out corpus perplexity")
    axes[1].set(title="held-out KL to each run's own teacher(s)")
    fig.suptitle(record["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    """``"65536,256k,1M"`` -> token counts (``k`` = 1,000 and ``M`` = 1,000,000, as ``recover --tokens``)."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        mult = {"k": 1_000, "m": 1_000_000}.get(item[-1].lower(), 1)
        out.append(int(float(item[:-1] if mult > 1 else item) * mult))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="extra recover flags of one run, shell-quoted ({teacher}: the original teacher, "
                        "{corrected:N}: it corrected for N tokens); repeat for more")
    p.add_argument("--preset", action="append", default=[], choices=("correction", "onpolicy"),
                   help="correction: orig, corr<N> per --correction-tokens, both at each --teacher-weights; "
                        "onpolicy: --lambdas x (forward KL, JSD(--jsd-beta))")
    p.add_argument("--correction-tokens", type=ints, default=[], help="N,N,... teacher-correction budgets")
    p.add_argument("--teacher-weights", type=floats, default=[0.3, 0.5, 0.7],
                   help="the original teacher's weight in the both-teachers sweep (the corrected one gets the rest)")
    p.add_argument("--lambdas", type=floats, default=[0.0, 0.25, 0.5], help="--on-policy values of the preset")
    p.add_argument("--jsd-beta", type=float, default=0.5)
    p.add_argument("--charge-correction", action="store_true",
                   help="take a corrected teacher's correction seconds out of its variant's budget")
    p.add_argument("--correct-flags", type=shlex.split, default=[], help="extra flags of minicompress correct")
    p.add_argument("--budget", type=float, default=1800.0, help="training seconds of every run (equal wall time)")
    p.add_argument("--probe-steps", type=int, default=4, help="optimizer steps of a probe (the first is dropped)")
    p.add_argument("--curve-points", type=int, default=6, help="held-out evaluations per run (the time curve)")
    p.add_argument("--common", type=shlex.split, default=["--compile", "true"],
                   help="flags of every run and probe (default '--compile true')")
    shared_arguments(p)
    p.add_argument("--tag", default=None, help="names the run folder and the JSON (default: the variants' labels)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/distill_variants-<tag>.json)")
    return p.parse_args(argv)


def shared_arguments(p: argparse.ArgumentParser) -> None:
    """The student, teacher, data and evaluation arguments this script and ``peers_gkd.py`` share."""
    p.add_argument("--student", default=STUDENT, help="the pruned student (HF folder)")
    p.add_argument("--teacher", default="smollm2-135m", help="the original teacher")
    p.add_argument("--data", default=str(DATA / "corpus"), help="the recovery corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=16384, help="recover's held-out tokens (its --eval-tokens)")
    p.add_argument("--wikitext", default=str(DATA / "wikitext2" / "test.txt"))
    p.add_argument("--generated", default=None, help="held-out teacher text (JSONL); built once when not given")
    p.add_argument("--domain-tokens", type=int, default=16384, help="tokens of WikiText-2, generated, docstrings")
    p.add_argument("--corpus-tokens", type=int, default=8192, help="held-out corpus tokens scored")
    p.add_argument("--prompts", type=int, default=32, help="held-out rows whose starts the student continues")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each held-out prompt")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens the student samples after each prompt")
    p.add_argument("--workdir", default=str(WORKDIR), help="runs, probes, caches (resumable)")
    p.add_argument("--tiny", action="store_true", help="every path on a tiny random Llama (smoke test)")
    p.add_argument("--render", action="store_true", help="only print the tables and redraw the PNG from the JSON")


def settings(args) -> dict:
    """The numbers of this benchmark (``--tiny`` shrinks them and makes its models)."""
    s = {"student": str(Path(args.student).expanduser()), "teacher": args.teacher, "data": args.data,
         "seed": args.seed, "threads": args.threads, "common": list(getattr(args, "common", [])), "seq_len": 512,
         "eval_tokens": args.eval_tokens, "domain_tokens": args.domain_tokens, "corpus_tokens": args.corpus_tokens,
         "prompts": (args.prompts, args.prompt_tokens, args.new_tokens), "correct_common": [], "onpolicy_common": []}
    if args.tiny:
        from peers import make_tiny

        base = Path(args.workdir).expanduser() / "tiny"
        base.mkdir(parents=True, exist_ok=True)
        os.environ["MINICOMPRESS_TOKEN_CACHE"] = str(base / "tokens")
        s.update(make_tiny(base, args.seed))
        s.update(seq_len=64, eval_tokens=256, domain_tokens=1024, corpus_tokens=256, prompts=(4, 16, 16),
                 common=["--seq-len", "64", "--global-batch-tokens", "512", "--compile", "false"],
                 correct_common=["--seq-len", "64", "--global-batch-tokens", "512"],
                 onpolicy_common=["--on-policy-prompt-tokens", "16"])
    return s


def main() -> None:
    args = parse_args()
    console = make_console(230)
    variants: dict[str, list[str]] = {}
    try:
        for preset in args.preset:
            variants.update(preset_variants(preset, args))
        for text in args.variant:
            label, flags = parse_variant(text)
            variants[label] = flags
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    tag = args.tag or ("tiny-" if args.tiny else "") + "-".join(args.preset or list(variants)[:3])
    out_json = Path(args.output) if args.output else (
        Path(args.workdir).expanduser() / "tiny" / f"distill_variants-{tag}.json" if args.tiny
        else RESULTS / f"distill_variants-{tag}.json")
    if args.render:
        record = json.loads(out_json.read_text())
        render(record, console)
        plot(record, out_json.with_suffix(".png"))
        return
    if not variants:
        raise SystemExit("error: no variant: give --preset and/or --variant LABEL=FLAGS")
    if args.budget <= 0 or args.probe_steps < 2:
        raise SystemExit("error: --budget must be > 0 and --probe-steps >= 2")
    s = settings(args)
    check_settings(s)
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    s["workdir"] = str(Path(args.workdir).expanduser() / ("tiny" if args.tiny else "") / tag)
    runner = Runner(args, s, console)
    corrected, correction_s, correction_errors = {}, {}, {}
    for n in sorted({n for flags in variants.values() for n in corrections_in(flags)}):
        try:
            corrected[n], correction_s[n] = runner.corrected(n)
        except RuntimeError as err:  # its variants become rows that say so
            correction_errors[n] = str(err)[-600:]
            console.log(f"correction {n}: failed: {correction_errors[n]}")
    suite = build_suite(args, s, console)
    evals = Path(s["workdir"]) / "eval"
    record = run_record(title=f"{Path(s['student']).name}: distillation variants at {args.budget:.0f} s each ({tag})",
                        tag=tag, student=s["student"], student_name=Path(s["student"]).name, teacher=s["teacher"],
                        budget_s=args.budget, threads=args.threads, settings={k: v for k, v in s.items()},
                        charge_correction=args.charge_correction, domains=suite.signature["domains"],
                        suite=suite.signature, teacher_reference=suite.teacher_reference(evals / "teacher.json"),
                        start=suite.evaluate_folder(s["student"], evals / "start.json"),
                        teachers={f"corr{short_tokens(n)}": suite.evaluate_folder(folder, evals / f"teacher-{n}.json")
                                  for n, folder in corrected.items()},
                        correction_seconds={str(n): v for n, v in correction_s.items()}, runs={})

    def save() -> None:
        write_json(out_json, record)
        plot(record, out_json.with_suffix(".png"))

    for label, flags in variants.items():
        used = corrections_in(flags)
        missing = [correction_errors.get(n, "not built") for n in used if n not in corrected]
        budget = args.budget - (sum(correction_s[n] or 0 for n in used if n in corrected)
                                if args.charge_correction else 0)
        if missing or budget <= 0:
            record["runs"][label] = {"label": label, "flags": flags, **gkd_settings(flags), "status": "failed",
                                     "error": missing[0] if missing else "the correction took the whole budget"}
            continue
        try:
            res = runner.run(label, resolve_flags(flags, s["teacher"], corrected), budget)
            res["flags"] = flags  # as given (placeholders), the resolved ones are in the log
            res["correction_s"] = sum(correction_s[n] or 0 for n in used) if used else None
            res["eval"] = suite.evaluate_folder(res["output"], evals / f"{label}.json")
            res["status"] = "done"
        except RuntimeError as err:  # a variant whose flags this checkout lacks is a row that says so
            res = {"label": label, "flags": flags, **gkd_settings(flags), "status": "failed", "error": str(err)[-600:]}
            console.log(f"{label}: failed: {res['error']}")
        record["runs"][label] = res
        save()

    done = [r for r in record["runs"].values() if r.get("trained_s")]
    if done:
        record["common_time_s"] = t_star = min(r["trained_s"] for r in done)
        for r in done:
            pts = [(p["elapsed_s"], p["eval_perplexity"]) for p in r["curve"] if "eval_perplexity" in p]
            r["held_out_at_T"] = value_at(pts, t_star)
    sweep = [r for label, r in record["runs"].items() if label.startswith("both") and r.get("eval")]
    if sweep:  # the weight sweep's pick, by held-out corpus KL to the original teacher
        record["best_of_sweep"] = min(sweep, key=lambda r: r["eval"]["corpus"]["kl_to_teacher"])["label"]
    save()
    render(record, console)
    console.log(f"wrote {out_json} and {out_json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
