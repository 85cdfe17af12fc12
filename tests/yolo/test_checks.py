"""``lorakit.yolo.checks``: exclude-like patterns (issue item 3), value by value."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.yolo.checks import as_patterns


def test_patterns_a_string_is_one() -> None:
    """Issue item 3: a string is one pattern, a list its patterns, None none."""
    assert as_patterns("exclude", "model.0.conv") == ("model.0.conv",)
    assert as_patterns("exclude", ["a", "b"]) == ("a", "b")
    assert as_patterns("exclude", None) == ()
    with pytest.raises(ConfigError, match=r"train_modules: expected path patterns \(strings\), got 3"):
        as_patterns("train_modules", ["a", 3])
