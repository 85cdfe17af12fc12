"""The tests' own "plain checkpoint" check: it must see a pickled lorakit class and must not be fooled
by the word in a string (Ultralytics stores the checkout's git commit message in every checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from yolo_helpers import assert_no_lorakit_class, pickled_modules

import lorakit


def test_finds_lorakit_classes_and_ignores_strings(tmp_path: Path) -> None:
    adapted = nn.Sequential(nn.Linear(4, 4))
    lorakit.inject(adapted, lorakit.LoraConfig(r=2, targets=["0"]))
    message = {"git": {"message": "lorakit: a commit subject naming the project"}}
    torch.save({"model": adapted, "train_args": message}, tmp_path / "adapted.pt")
    torch.save({"model": nn.Sequential(nn.Linear(4, 4)), "train_args": message}, tmp_path / "plain.pt")

    assert "lorakit.layers.base" in pickled_modules(tmp_path / "adapted.pt")
    with pytest.raises(AssertionError, match="pickles lorakit classes"):
        assert_no_lorakit_class(tmp_path / "adapted.pt")
    assert b"lorakit" in (tmp_path / "plain.pt").read_bytes()  # the word is there, as a string
    assert_no_lorakit_class(tmp_path / "plain.pt")
