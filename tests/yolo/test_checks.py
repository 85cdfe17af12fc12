"""``lorakit.yolo.checks``: the early checks of optimizer, format and device (issue item 10),
value by value. The CLI tests run them end to end."""

from __future__ import annotations

import pytest
import torch

from lorakit import ConfigError
from lorakit.yolo.checks import check_device, check_format, check_optimizer


def test_optimizer_names() -> None:
    """Issue item 10: Ultralytics' names in any case; MuSGD and unknown names refused, naming the key."""
    assert check_optimizer("adamw") == "AdamW" and check_optimizer("auto") == "auto"
    with pytest.raises(ConfigError, match=r"optimizer: expected one of auto, SGD, .*, got 'Foo'"):
        check_optimizer("Foo")
    with pytest.raises(ConfigError, match="optimizer='musgd' is not supported with LoRA"):
        check_optimizer("musgd")


def test_format_names_and_aliases() -> None:
    """Issue item 10: aliases resolve as Ultralytics resolves them; a near miss is refused with the guess
    (Ultralytics would export the guessed format with only a warning)."""
    assert check_format("ONNX", modules=False) == "onnx"
    assert check_format("tflite", modules=False) == "litert"
    assert check_format("trt", modules=False) == "engine"
    with pytest.raises(ConfigError, match=r"format: expected one of torchscript, onnx, .*got 'onx' \(did you mean"):
        check_format("onx", modules=False)
    with pytest.raises(ConfigError, match="got 5"):
        check_format(5, modules=False)
    assert check_format("onnx") == "onnx"  # onnx is installed here (the ONNX export tests need it)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_device_without_cuda() -> None:
    """Issue item 10: every spelling of a CUDA device is refused without CUDA; cpu, the automatic
    choice and -1 (an idle GPU, else the CPU, as Ultralytics decides) pass."""
    for ok in (None, "", "cpu", "CPU", -1, "-1", "npu:0"):
        check_device(ok)
    for cuda in ("cuda:0", "cuda", 0, "0", (0, 1), [0], "0,1", torch.device("cuda", 0)):
        with pytest.raises(ConfigError, match="asks for CUDA, which is not available here"):
            check_device(cuda)
    with pytest.raises(ConfigError, match=r"device: expected cpu, mps, .*got 'gpu'"):
        check_device("gpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device='mps': MPS is not available here"):
            check_device("mps")
