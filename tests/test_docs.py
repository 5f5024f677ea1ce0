"""The documentation: README.md and docs/*.md run as written, and their links resolve.

A command block is *runnable* when the line just before its fence is ``<!-- runnable -->``
(optionally ``<!-- runnable needs=pkg1,pkg2 -->``: skipped where one of those Python packages is
missing). Every command of every runnable block runs from the repository root, one test per
block, named by file and line: the ``minicompress ...`` commands through the checkout's own
``minicompress.cli.main`` (what ``python -m minicompress`` runs), all in one fresh interpreter, and
``python ...`` commands as they are. docs/README.md states the rules for a runnable block.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHARED_DATA = ROOT.parent / "shared" / "data"
MAX_README_LINES = 250
TOPIC_PAGES = ("models", "pruning", "recovery", "data", "evaluation", "progressive", "python-api", "architecture")

MARKER = re.compile(r"^<!--\s*runnable(?P<options>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "&"}


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str  # the fence's info string ("bash")
    text: str
    runnable: bool
    needs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (fences nested in a longer fence are content)."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m["fence"], i
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        needs: tuple[str, ...] = ()
        if marker:
            options = dict(opt.split("=", 1) for opt in marker["options"].split() if "=" in opt)
            unknown = set(marker["options"].split()) - {f"needs={options.get('needs')}"}
            assert not unknown, f"{rel(path)}:{start}: unknown runnable option(s) {sorted(unknown)}"
            needs = tuple(n for n in options.get("needs", "").split(",") if n)
        blocks.append(Block(path, start + 1, m["info"].strip(), "\n".join(body), bool(marker), needs))
        i += 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [block for path in doc_files() for block in fenced_blocks(path) if block.runnable]


def commands(block: Block) -> list[list[str]]:
    """The block's commands as argument lists: ``\\`` continues a line, ``#`` starts a comment."""
    joined = re.sub(r"\\\n", " ", block.text)
    result = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            result.append(argv)
    return result


def argv_for(argv: list[str], where: str) -> list[str]:
    bad = SHELL_OPERATORS.intersection(argv)
    assert not bad, f"{where}: a runnable block holds plain commands, no shell operators {sorted(bad)}"
    if argv[0] == "minicompress":
        return [sys.executable, "-m", "minicompress", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    raise AssertionError(f"{where}: a runnable command starts with minicompress or python, not {argv[0]!r}")


def reads_missing_shared_data(block: Block, argvs: list[list[str]]) -> bool:
    """Whether the block (or a config file it names) reads ../shared/data and that is absent here."""
    if SHARED_DATA.is_dir():
        return False
    texts = [block.text]
    for argv in argvs:
        texts += [(ROOT / a).read_text() for a in argv if a.endswith((".yaml", ".yml")) and (ROOT / a).is_file()]
    return any("../shared/data" in text for text in texts)


BLOCKS = runnable_blocks()

# Every ``minicompress`` command of the runnable blocks runs in one fresh interpreter through the CLI's
# ``main`` (what ``python -m minicompress`` calls): one start-up and one import of torch and
# transformers instead of one per command keeps this file at seconds, not a minute.
_CLI_RUNNER = r"""
import json, sys, traceback
from minicompress.cli import main
for line in sys.stdin:
    key, argv = json.loads(line)
    print(f"=== begin {key}", flush=True)
    try:
        rc = main(argv)
    except SystemExit as exit:
        rc = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"=== end {key} rc={rc}", flush=True)
"""


def command_env() -> dict[str, str]:
    return dict(os.environ, MINICOMPRESS_PROGRESS="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                OMP_NUM_THREADS="1", COLUMNS="120",
                PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def skip_reason(block: Block) -> str | None:
    missing = [n for n in block.needs if importlib.util.find_spec(n) is None]
    if missing:
        return f"{block.name} needs {', '.join(missing)} (not installed)"
    if reads_missing_shared_data(block, commands(block)):
        return f"{block.name} reads ../shared/data, which this checkout lacks"
    return None


@pytest.fixture(scope="module")
def cli_results() -> dict[str, tuple[int | None, str]]:
    """``{"file:line#i": (exit status, output)}`` of every ``minicompress`` command of a runnable block."""
    jobs = [(f"{b.name}#{i}", argv[1:]) for b in BLOCKS if skip_reason(b) is None
            for i, argv in enumerate(commands(b)) if argv[0] == "minicompress"]
    if not jobs:
        return {}
    result = subprocess.run([sys.executable, "-c", _CLI_RUNNER], input="".join(json.dumps(j) + "\n" for j in jobs),
                            cwd=ROOT, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=600)
    out: dict[str, tuple[int | None, str]] = {}
    for key, _ in jobs:
        begin = result.stdout.find(f"=== begin {key}\n")
        m = re.search(rf"^=== end {re.escape(key)} rc=(-?\d+)$", result.stdout[max(begin, 0):], re.M)
        if begin < 0 or not m:  # the runner died before finishing this command
            out[key] = (None, result.stdout[-3000:])
        else:
            out[key] = (int(m[1]), result.stdout[begin:begin + m.start()][-3000:])
    return out


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_runnable_block(block: Block, cli_results):
    assert block.info.split()[:1] in (["bash"], ["sh"]), f"{block.name}: the runnable marker precedes a ```bash fence"
    argvs = commands(block)
    assert argvs, f"{block.name}: runnable block without a command"
    for argv in argvs:
        argv_for(argv, block.name)  # only minicompress / python commands, no shell operators
    if (reason := skip_reason(block)) is not None:
        pytest.skip(reason)
    for i, argv in enumerate(argvs):
        where = f"{block.name}: {shlex.join(argv)}"
        if argv[0] == "minicompress":
            rc, output = cli_results[f"{block.name}#{i}"]
        else:
            done = subprocess.run(argv_for(argv, block.name), cwd=ROOT, env=command_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=300)
            rc, output = done.returncode, done.stdout[-3000:]
        assert rc == 0, f"{where} exited {rc}\n{output}"


def test_every_topic_page_exists_and_has_a_runnable_block():
    runnable_pages = {b.path.stem for b in BLOCKS if b.path.parent == DOCS}
    for page in TOPIC_PAGES:
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        assert page in runnable_pages, f"docs/{page}.md has no <!-- runnable --> block"


def test_markers_precede_fences():
    """A runnable marker not directly above a fence would silently run nothing."""
    for path in doc_files():
        lines = path.read_text().splitlines()
        fence_lines = {b.line - 1 for b in fenced_blocks(path)}  # 0-based lines of opening fences
        inside = set()
        for b in fenced_blocks(path):
            inside.update(range(b.line, b.line + b.text.count("\n") + 1))
        for i, line in enumerate(lines):
            if MARKER.match(line) and i not in inside:
                assert i + 1 in fence_lines, f"{rel(path)}:{i + 1}: <!-- runnable --> must be the line just before a fence"


def test_readme_is_the_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, f"README.md has {len(text.splitlines())} lines (at most {MAX_README_LINES})"
    quickstart = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, re.M | re.S)
    assert quickstart, "README.md lost its '## Quickstart' section"
    quick = quickstart[1]
    assert "minicompress run configs/quickstart.yaml" in quick
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"^(python -m pip install .*python -m pytest -q)$", ci, re.M)
    assert test_command, ".ci/run lost its install-and-test line"
    assert test_command[1] in quick, "README's Quickstart test command differs from .ci/run's"
    for page in TOPIC_PAGES:
        assert f"docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, markup and punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (outside code), with GitHub's -1, -2 for repeats."""
    code = {n for b in fenced_blocks(path) for n in range(b.line, b.line + b.text.count("\n") + 2)}
    seen: dict[str, int] = {}
    result = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and n not in code:
            base = github_anchor(m[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every Markdown link outside code blocks and code spans."""
    code = {n for b in fenced_blocks(path) for n in range(b.line, b.line + b.text.count("\n") + 2)}
    found = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if n in code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        found += [(n, m[1]) for m in re.finditer(r"\]\(([^)\s]+)\)", line)]
    return found


LINKED = [rel(p) for p in doc_files()] + ["benchmarks/RESULTS.md"]


@pytest.mark.parametrize("name", LINKED)
def test_relative_links_resolve(name):
    path = ROOT / name
    broken = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{name}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{name}:{n}: {target} (no heading #{anchor} in {rel(dest)})")
    assert not broken, "\n".join(broken)


def test_github_anchor():
    assert github_anchor("Recovery quality (issue 4): four ways, 131k tokens each") == \
        "recovery-quality-issue-4-four-ways-131k-tokens-each"
    assert github_anchor("Data-free recovery: `minicompress generate`") == "data-free-recovery-minicompress-generate"
    assert github_anchor("Architecture search (`--target-params`)") == "architecture-search---target-params"
    assert github_anchor("Served in llama.cpp") == "served-in-llamacpp"
