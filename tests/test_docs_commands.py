"""The README and docs/ stay true: their quick commands run, every relative link resolves, and the README
stays a front door (at most 300 lines, with Architecture in its first 120).

A fenced block whose info string is `bash quick` is run (the convention is in docs/README.md): the quick
blocks of one page run in order, in one fresh temporary directory that links to the repository's top-level
folders, with `set -euo pipefail` and the repository's .venv/bin first on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `polyfid`
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BIN = ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin").is_dir() else Path(sys.executable).parent
# Top-level entries of a checkout that a quick block must not see or write into: its outputs go to its own folder.
NOT_LINKED = {"runs", "mlflow.db", "mlflow.db.lock", "mlartifacts", "build", "__pycache__"}
MAX_README_LINES = 300
ARCHITECTURE_WITHIN = 120
OPENING = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    page: Path
    line: int  # 1-based line of the opening fence
    info: str  # the info string after the fence, e.g. "bash quick"
    text: str

    @property
    def quick(self) -> bool:
        return self.info.split()[:2] == ["bash", "quick"]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order (CommonMark fences: a closing fence is at least as long as the
    opening one, of the same character; list-item indentation is stripped from the block's lines)."""
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip(" ")
        indent = len(lines[i]) - len(stripped)
        m = OPENING.match(stripped)
        if m is None:
            i += 1
            continue
        fence, start = m["fence"], i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close and set(close) == {fence[0]} and len(close) >= len(fence):
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        blocks.append(Block(page, start + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def quick_pages() -> list[Path]:
    return [p for p in PAGES if any(b.quick for b in fenced_blocks(p))]


def workdir(tmp_path: Path) -> Path:
    """A working directory in which the repository's paths (data_shards/demo/..., launch/recipes/...) resolve,
    while whatever a block writes (runs/, errors.json) stays in the temporary directory."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in NOT_LINKED or entry.name.endswith(".egg-info"):
            continue
        (work / entry.name).symlink_to(entry)
    return work


def test_the_docs_have_quick_blocks():
    """The convention is in use, and the page that states it exists."""
    assert (ROOT / "docs" / "README.md").is_file()
    blocks = [b for p in PAGES for b in fenced_blocks(p) if b.quick]
    assert blocks, "no fenced block is marked ```bash quick in README.md or docs/*.md"
    assert any(b.page == README for b in blocks), "README.md has no quick block"


@pytest.mark.parametrize("page", quick_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_quick_blocks_run(page: Path, tmp_path: Path):
    work = workdir(tmp_path)
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["POLYFID_CACHE"] = str(tmp_path / "cache")  # a `corpus:NAME` store would be built here, not in ~/.cache
    env.pop("POLYFID_MODELS", None)  # the shipped named models only
    env.setdefault("MPLBACKEND", "Agg")
    for block in (b for b in fenced_blocks(page) if b.quick):
        try:
            done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.text], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.where}: the quick block ran over 120 s; a quick block takes seconds\n{block.text}")
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-3000:]
            pytest.fail(f"{block.where}: the quick block exited with status {done.returncode}\n"
                        f"--- block ---\n{block.text}--- output (tail) ---\n{output}")


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"
    headings = [n for n, line in enumerate(lines, 1) if re.match(r"#{1,6}\s+Architecture\b", line)]
    assert headings, "README.md has no Architecture heading"
    assert headings[0] <= ARCHITECTURE_WITHIN, (
        f"README.md's Architecture heading is on line {headings[0]}; it belongs in the first {ARCHITECTURE_WITHIN}")


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)",
                  re.MULTILINE)


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link on a page, outside fenced blocks and inline code."""
    fenced = {n for b in fenced_blocks(page) for n in range(b.line, b.line + b.text.count("\n") + 2)}
    out = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if n in fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for m in LINK.finditer(line):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # http:, https:, mailto: and anchors on the same page
            out.append((n, target))
    return out


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for n, target in relative_links(page):
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "links to files that do not exist:\n  " + "\n  ".join(broken)


def test_the_block_finder_reads_fences_as_commonmark(tmp_path: Path):
    """A longer fence holds a shorter one, and a block inside a list item loses its indentation."""
    page = tmp_path / "page.md"
    page.write_text("text\n````markdown\n```bash quick\nfalse\n```\n````\n\n- item\n\n  ```bash quick\n"
                    "  echo one\n  ```\n")
    blocks = fenced_blocks(page)
    assert [(b.line, b.info, b.quick) for b in blocks] == [(2, "markdown", False), (10, "bash quick", True)]
    assert blocks[1].text == "echo one\n"
