"""README.md's fenced code blocks, who runs each one, and the stand-ins substituted for a reader's files.

Every block is claimed by exactly one runner (:func:`runner`), or listed in :data:`NOT_RUN` with the
reason; tests/unit/test_readme.py fails for a block nobody claims. Runners substitute tiny stand-ins
(``yolo26n.pt`` -> a small model saved here, ``data.yaml`` -> a synthetic dataset, ...) into the
block's text with :func:`substitute`, which fails for a file name or placeholder it has no stand-in
for, so a new block cannot silently go untested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# Blocks that cannot run in the tests, by their first line, each with the reason.
NOT_RUN = {
    'pip install "lorakit[serve,yolo]"      # or [serve,hf] for language models': (
        "installs packages and starts servers that run until stopped; tests/serve starts the same servers "
        "(lorakit serve yolo through the CLI in a subprocess) on 127.0.0.1 and sends them real requests"
    ),
    "lorakit yolo compare model=base.pt data=data.yaml epochs=20 imgsz=640 base_data=old.yaml": (
        "trains eight strategies, a process each (minutes); the same command on stand-ins is "
        "tests/yolo/test_compare.py (every strategy, column, resume and bad input)"
    ),
    "lorakit hf compare model=models/llama data=train.jsonl epochs=3 base_data=old.jsonl": (
        "trains eight strategies (minutes); the same command on a tiny config-built LLaMA is "
        "tests/hf/test_compare.py (every strategy, column, resume and bad input)"
    ),
    "make demo   # creates .venv if missing, installs everything, runs the main demo": (
        "creates a virtual environment and pip-installs torch and the extras (network, minutes); what it runs "
        "is tested directly: tests/yolo/test_demo.py (the demo) and the suite itself (make test)"
    ),
}

# Which test file runs the blocks of each kind.
RUNNERS = {
    "python": "tests/unit/test_readme.py",
    "py": "tests/yolo/test_readme_yolo.py",
    "bash-cli": "tests/hf/test_readme_cli.py",
    "bash-yolo": "tests/yolo/test_readme_yolo.py",
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0] if self.text else ""


def blocks() -> list[Block]:
    """Every fenced block of README.md, in order."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        out.append(Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)))
    return out


def runner(block: Block) -> str:
    """A key of :data:`RUNNERS`, ``not-run`` (in NOT_RUN) or ``text`` (a diagram, no code).

    Raises AssertionError for a block no test runs, naming its line.
    """
    if block.first_line in NOT_RUN:
        return "not-run"
    if block.lang in ("python", "py"):
        return block.lang
    if block.lang == "bash":
        commands = [c for c in block.text.splitlines() if c.strip()]
        verbs = {tuple(c.split()[:2]) for c in commands}
        if all(v[0] == "lorakit" and v[1] in ("inspect", "merge", "diff", "hf") for v in verbs):
            return "bash-cli"
        if all(v == ("lorakit", "yolo") for v in verbs):
            return "bash-yolo"
    if block.lang == "" and not re.search(r"^\s*(lorakit|python|make|pip)\b", block.text, flags=re.M):
        return "text"
    raise AssertionError(
        f"README.md line {block.line}: no test runs this {block.lang or 'plain'} block; give it a runner in "
        "tests/readme_blocks.py (or list it in NOT_RUN with the reason it cannot run)"
    )


# File names and placeholders a block may use: each needs a stand-in (or None: an output the block writes).
_NAMES = re.compile(
    r"(?<![\w./-])(?:[\w.-]+/)*[\w.-]+\.(?:pt|yaml|yml|jpg|jpeg|png|jsonl|json|safetensors|onnx)\b"
    r"|(?<![\w./-])(?:runs|adapters|images|path)/[\w./-]*"
    r"|(?<==)[A-Z][A-Z_]+\b"
)
_BIG = re.compile(r"\b(epochs=(?:[2-9]|\d\d+)|imgsz=(?:6[5-9]|[7-9]\d|\d{3,}))\b")


def names(text: str) -> set[str]:
    """The file names, run folders and placeholders (``DIR``) in ``text``."""
    return set(_NAMES.findall(text))


def substitute(block: Block, stand_ins: dict[str, str | None], tiny: bool = True) -> str:
    """``block.text`` with each name in ``stand_ins`` replaced (``None``: kept as written).

    Raises AssertionError naming the README line when the block uses a name without a stand-in,
    or (``tiny``) still asks for a training of more than 1 epoch or images over 64 pixels after
    substitution.
    """
    missing = names(block.text) - stand_ins.keys()
    if missing:
        raise AssertionError(
            f"README.md line {block.line}: the block uses {sorted(missing)}, which the test has no stand-in "
            "for; add one to its stand-ins so the block still runs"
        )
    text = block.text
    for name in sorted(stand_ins, key=len, reverse=True):  # runs/a/x before runs/a
        new = stand_ins[name]
        if new is not None:
            text = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/-]|\.\w)", lambda _m, new=new: new, text)
    big = _BIG.findall(text) if tiny else []
    if big:
        raise AssertionError(f"README.md line {block.line}: the substituted block still trains big: {big}")
    return text
