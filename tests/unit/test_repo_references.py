"""Code, tests and benchmarks refer only to files inside the repository.

Issue 13 item 10: ``yolo/trainer.py`` pointed readers at a developer notes file that
lives outside the repository (in the team's shared folder), so nobody with a clone
could follow it. Facts are stated in place instead; this scan keeps it that way.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        (
            r"shared" + r"/notes",  # the team's notes folder
            r"\.\./" + r"shared",  # a path climbing out of the repository to it
            r"(?<![\w/.])notes" + r"/[\w.-]+\.md",  # a notes file named relative to some outside root
        )
    )
)


def _files() -> list[Path]:
    return [
        p
        for folder in ("src", "tests", "bench")
        for p in sorted((ROOT / folder).rglob("*"))
        if p.is_file() and p.suffix in {".py", ".md", ".txt", ".toml", ".yaml", ".json", ".cfg", ".ini"}
    ]


def test_the_pattern_catches_outside_references() -> None:
    for text in ("see notes/" + "ultralytics.md", "../" + "shared/x.md", "/work/shared" + "/notes/a.md"):
        assert OUTSIDE.search(text), text
    for text in ("bench/yolo_quality.md", "runs/demo/results.md", "a/notes/b.md"):
        assert not OUTSIDE.search(text), text


def test_no_file_refers_to_notes_outside_the_repository() -> None:
    files = _files()
    assert any(p.name == "trainer.py" for p in files)  # the scan reaches src/lorakit/yolo
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
