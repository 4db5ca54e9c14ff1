"""The repository stands alone: its notes are in docs/, and every citation of them resolves.

* (a) no mention of the notes kept beside the repository (``METHODS.md``, ``DESIGN.md``) or of the folder beside it
  (``../shared``) in ``src/``, ``README.md`` and ``docs/`` — a reader of a fresh clone could not open them. The one
  exception the rule allows: a command quoted in ``docs/results.md`` that sets the data root to the developers' copy
  (``SEMSSL_DATA_DIR=.../shared/data``) may name it, because that is the command that was run. ``tests/`` and
  ``benchmarks/`` may locate ``../shared/data`` (optional data, see conftest.py) but cite no note there either.
* (b) every citation ``docs/<path>.md §<text>`` in the sources, recipes, README, docs, benchmarks and tests names an
  existing file, and ``<text>`` starts with one of that file's headings (``#`` to ``####``, outside code blocks)
  followed by a non-alphanumeric character or the end; a plain ``docs/<path>.md`` names an existing file. Relative
  markdown links in ``README.md`` and ``docs/`` point to files that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".ini", ".sh"}
SKIP_PARTS = {"__pycache__", ".pytest_cache"}

FORBIDDEN = ("METHODS.md", "DESIGN.md", "../shared")
#: the quoted command of docs/results.md that may name ../shared: it sets the data root to the developers' copy
RESULTS_DATA_ROOT = re.compile(r"SEMSSL_DATA_DIR=\S*\.\./shared/data")

#: ``docs/<path>.md`` not preceded by a path character, optionally followed by `` §<text>`` (to the end of the line)
CITATION = re.compile(r"(?<![\w./-])docs/((?:[\w.-]+/)*[\w.-]+\.md)(?: ?§ ?([^\n]*))?")
HEADING = re.compile(r"^#{1,4}\s+(.+?)\s*#*\s*$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_files(*tops: str) -> list[Path]:
    """The text files under ``tops`` (folders or files, relative to the root), build outputs left out."""
    out: list[Path] = []
    for top in tops:
        path = ROOT / top
        if path.is_file():
            out.append(path)
            continue
        for p in sorted(path.rglob("*")):
            if (p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIP_PARTS.intersection(p.parts)
                    and not any(part.endswith(".egg-info") for part in p.parts)):
                out.append(p)
    return out


def headings(md: Path) -> list[str]:
    """The ``#``..``####`` headings of a markdown file, outside fenced code blocks."""
    found, fenced = [], False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            found.append(m.group(1))
    return found


def resolves(text: str, names: list[str]) -> bool:
    """Whether some heading is a prefix of ``text`` that ends at a word boundary."""
    return any(text.startswith(h) and (len(text) == len(h) or not text[len(h)].isalnum()) for h in names)


def broken_citations(text: str, root: Path = ROOT) -> list[str]:
    """The citations of ``text`` that do not resolve under ``root`` (file missing, or no heading matches)."""
    bad: list[str] = []
    cache: dict[Path, list[str]] = {}
    for m in CITATION.finditer(text):
        target, section = root / "docs" / m.group(1), m.group(2)
        if not target.is_file():
            bad.append(f"docs/{m.group(1)} (no such file)")
            continue
        if section is None:
            continue
        names = cache.setdefault(target, headings(target))
        if not resolves(section.strip(), names):
            bad.append(f"docs/{m.group(1)} §{section.strip()[:60]} (no heading of it starts the text)")
    return bad


def test_no_notes_outside_the_repository_are_named() -> None:
    hits = []
    for path in text_files("src", "README.md", "docs"):
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for word in FORBIDDEN:
                if word not in line:
                    continue
                if word == "../shared" and rel == "docs/results.md" and RESULTS_DATA_ROOT.search(line):
                    continue
                hits.append(f"{rel}:{n}: {word}: {line.strip()[:100]}")
    assert not hits, "mentions of notes or folders outside the repository:\n" + "\n".join(hits)


def test_tests_and_benchmarks_cite_no_outside_note() -> None:
    me = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
            for p in text_files("tests", "benchmarks") if p.resolve() != me
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if "METHODS.md" in line or "DESIGN.md" in line]
    assert not hits, "citations of the notes beside the repository:\n" + "\n".join(hits)


def test_every_docs_citation_resolves() -> None:
    bad = []
    for path in text_files("src", "README.md", "docs", "benchmarks", "tests", "Makefile", "pyproject.toml"):
        if path.resolve() == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            bad += [f"{path.relative_to(ROOT)}:{n}: {b}" for b in broken_citations(line)]
    assert not bad, "citations that do not resolve:\n" + "\n".join(bad)


def test_markdown_links_point_to_existing_files() -> None:
    bad = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for m in LINK.finditer(line):
                target = m.group(1).split("#", 1)[0]
                if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue
                if not (md.parent / target).exists():
                    bad.append(f"{md.relative_to(ROOT)}:{n}: {m.group(1)}")
    assert not bad, "links to missing files:\n" + "\n".join(bad)


def test_docs_index_lists_every_file() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    files = [p.relative_to(ROOT / "docs").as_posix() for p in sorted((ROOT / "docs").rglob("*.md"))
             if p.name != "README.md" or p.parent != ROOT / "docs"]
    missing = [f for f in files if f"]({f})" not in index]
    assert not missing, f"docs/README.md does not list {missing}"
    assert "](figures/)" in index


@pytest.mark.parametrize("citation, ok", [
    ("docs/design.md §Batch", True),
    ("(docs/design.md §Batch size; Goyal et al.)", True),
    ("docs/design.md §CR and MCS).", True),
    ("docs/design.md §Batchx", False),          # a heading followed by more letters is another heading
    ("docs/design.md §No such heading", False),
    ("docs/nowhere.md", False),
    ("docs/nowhere.md §Batch", False),
    ("see docs/design.md for the contracts", True),
])
def test_the_resolver_fails_on_a_broken_citation(citation: str, ok: bool) -> None:
    assert (not broken_citations(citation)) is ok, broken_citations(citation)
