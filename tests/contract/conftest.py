"""Run the whole battery under both conv forward forms (activation and weight space)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch import nn

import lorakit


@pytest.fixture(autouse=True, params=["activation", "weight"], ids=["act-form", "weight-form"])
def conv_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = lorakit.handler_for(nn.Conv2d)
    assert handler is not None
    before = handler.mode  # type: ignore[attr-defined]
    handler.mode = request.param  # type: ignore[attr-defined]
    try:
        yield request.param
    finally:
        handler.mode = before  # type: ignore[attr-defined]
