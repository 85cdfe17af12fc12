"""``lorakit hf train ARGS stop_after=N``, then ``lorakit hf train ARGS resume=True``, in the same
processes: a stopped run and its resume under one ``torchrun`` launch (tests/hf/test_fsdp.py;
each launch costs 15 s or more of start-up here). The resume builds its model, optimizer and
Trainer afresh from the checkpoint, as a new launch would.

    torchrun --nproc_per_node=2 tests/hf/train_twice.py N ARGS...
"""

from __future__ import annotations

import sys

from lorakit.cli import main


def run(argv: list[str]) -> int:
    stop, args = argv[0], argv[1:]
    return main(["hf", "train", *args, f"stop_after={stop}"]) or main(["hf", "train", *args, "resume=True"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
