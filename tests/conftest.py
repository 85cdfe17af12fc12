"""Shared test setup: one torch thread (many times faster on this 2-core VM than two)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def yolo_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one Ultralytics config dir. Ultralytics reads YOLO_CONFIG_DIR once, when first
    imported, so every test folder that runs ``lorakit.yolo.offline.enable`` (tests/yolo, tests/serve)
    must give it the same dir, whichever folder imports ultralytics first."""
    return tmp_path_factory.mktemp("yolo_config")
