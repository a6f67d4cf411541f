"""The README reads once: each section heading appears once, and no run of lines is there twice (an edit
that pastes a copy of a section in is easy to miss in review and in rendering)."""

from collections import Counter

from conftest import REPO

RUN = 4  # consecutive non-blank lines that would not repeat by chance


def test_the_readme_has_each_section_once():
    lines = (REPO / "README.md").read_text().splitlines()
    headings = Counter(line for line in lines if line.startswith("## "))
    assert [h for h, n in headings.items() if n > 1] == []
    runs = Counter(
        tuple(lines[i : i + RUN])
        for i in range(len(lines) - RUN)
        if all(len(line.strip()) > 20 and not line.startswith("|") for line in lines[i : i + RUN])
    )
    assert [run[0] for run, n in runs.items() if n > 1] == []
