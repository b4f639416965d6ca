"""The README and docs/ agree with each other: every number the README's results table quotes is
in the page it links, and every figure is where a page points (and every figure is pointed at)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
FIGURES = {".png", ".gif", ".pdf", ".svg"}


def numbers(text: str) -> set[float]:
    """Every number in `text` (1,234.5 -> 1234.5; 16 and 16.0 are the same number)."""
    return {float(n.replace(",", "")) for n in re.findall(NUMBER, text)}


def results_rows() -> list[tuple[str, str, list[str]]]:
    section = README.split("## Results (measured here)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header and its rule
    assert rows, "the README's results table"
    parsed = []
    for row in rows:
        what, result, details = (cell.strip() for cell in row.strip().strip("|").split("|"))
        parsed.append((what, result, re.findall(r"\]\(([^)#]+)", details)))
    return parsed


def test_every_number_in_the_readme_results_table_is_in_the_doc_it_links():
    for what, result, links in results_rows():
        assert links, f"results row {what!r} links no doc"
        linked = " ".join((ROOT / link).read_text() for link in links)
        missing = sorted(numbers(result) - numbers(linked))
        assert not missing, f"README results row {what!r} quotes {missing}, which {', '.join(links)} does not"


def test_the_check_catches_a_number_the_doc_lacks():
    assert numbers("1.006 (16-4-1), 68,883,240 and 93.64%") == {1.006, 16, 4, 1, 68883240, 93.64}
    assert not numbers("quoted 93.65%") <= numbers("the doc says 93.64%")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_every_figure_referenced_exists_and_every_committed_figure_is_referenced():
    referenced = set()
    for page in markdown_files():
        for target in re.findall(r"\]\(([^)\s#]+\.(?:png|gif|pdf|svg))\)", page.read_text()):
            path = (page.parent / target).resolve()
            if "runs/" in target:  # figures of a run the page tells you how to make
                continue
            assert path.exists(), f"{page.relative_to(ROOT)} shows {target}, which does not exist"
            referenced.add(path)
    committed = {p.resolve() for p in (ROOT / "docs").rglob("*") if p.suffix in FIGURES}
    unreferenced = sorted(str(p.relative_to(ROOT)) for p in committed - referenced)
    assert not unreferenced, f"figures no page shows: {unreferenced}; show them or delete them"
