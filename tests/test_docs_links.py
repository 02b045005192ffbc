"""The README and docs/: every relative link and #anchor resolves, every page of docs/ is
reachable from the README by links, and the README stays one screen's worth (no network, < 1 s)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 220

#: ``[text](target)`` and ``![alt](target)``; the target up to the first space or ``)``
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: ``<a id="...">`` / ``<a name="...">``: anchors written by hand
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s*(```|~~~)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits, '_'; unicode letters too
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes in ``path``: one per heading (repeats get -1, -2, ...), and <a id>s."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(2).strip())
            k = seen.get(base, 0)
            seen[base] = k + 1
            found.add(base if k == 0 else f"{base}-{k}")
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(path.read_text(encoding="utf-8"))
            for m in LINK.finditer(line)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with ``path``'s relative links, one line each ('' if nothing)."""
    problems = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ... (no network here)
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
            continue
        try:
            dest.relative_to(root)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading makes the anchor #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def reachable(start: Path) -> set[Path]:
    """The markdown pages a reader reaches from ``start`` by following relative links."""
    seen, todo = {start.resolve()}, [start.resolve()]
    while todo:
        page = todo.pop()
        for _, target in links(page):
            file_part = target.partition("#")[0]
            if not file_part or re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.I):
                continue
            dest = (page.parent / file_part).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    return seen


def test_every_docs_page_is_reachable_from_the_readme():
    found = reachable(README)
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in found]
    assert missing == [], f"docs pages no link from the README leads to (link them from README.md): {missing}"


def test_readme_is_a_front_door():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; keep it under {MAX_README_LINES}, move the rest to docs/"


# ------------------------------------------------------------------ the checker itself
def test_the_checker_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Rule compiler speed (`x.py --threads 1 2`)\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#a-page) [ok](docs/a.md#rule-compiler-speed-xpy---threads-1-2) "
        "[ok](#title) [web](https://example.org/x#y) ![img](docs/a.md)\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#no-such-heading) [bad self](#nothing)\n"
        "```\n[in code](docs/ignored.md)\n```\n"
        "`[in a code span](docs/ignored.md)`\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert "docs/missing.md" in problems[0] and "no such file" in problems[0]
    assert "#no-such-heading" in problems[1] and "#nothing" in problems[2]


def test_slugs_follow_github():
    assert slug("The evaluator's funnel: what a rule costs") == "the-evaluators-funnel-what-a-rule-costs"
    assert slug("Child training speed on a CPU (convnet-cifar10 version 2, 2026-12-05)") == \
        "child-training-speed-on-a-cpu-convnet-cifar10-version-2-2026-12-05"
    assert slug("Three commands (fresh machine, Python 3.11)") == "three-commands-fresh-machine-python-311"
    assert slug("Figure 5 / Table 1") == "figure-5--table-1"
