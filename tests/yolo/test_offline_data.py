"""Offline switches, the network guard itself, and the synthetic data generator."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from lorakit.yolo import make_dataset, offline
from lorakit.yolo.data import DOMAINS


def test_offline_env_and_font(yolo_offline: str) -> None:
    assert offline.is_enabled()
    assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["YOLO_AUTOINSTALL"] == "False"
    for name in offline.FONT_NAMES:
        assert (Path(yolo_offline) / name).stat().st_size > 10_000
    import ultralytics.utils as uu
    from ultralytics.utils.checks import check_font

    assert uu.ONLINE is False and uu.AUTOINSTALL is False
    assert Path(uu.USER_CONFIG_DIR) == Path(yolo_offline)
    assert Path(check_font("Arial.ttf")) == Path(yolo_offline) / "Arial.ttf"


def test_enable_refuses_other_config_dir_after_import(tmp_path: Path) -> None:
    import ultralytics  # noqa: F401

    with pytest.raises(RuntimeError, match="cannot switch"):
        offline.enable(tmp_path)


def test_network_guard_records_and_refuses(network_guard: list[str]) -> None:
    with pytest.raises(OSError, match="blocked"):
        socket.getaddrinfo("example.com", 443)
    with socket.socket() as s, pytest.raises(OSError, match="blocked"):
        s.connect(("127.0.0.1", 9))
    assert [c.split("(")[0] for c in network_guard] == ["getaddrinfo", "connect"]
    network_guard.clear()  # the calls above were on purpose


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_dataset_deterministic_by_seed(tmp_path: Path) -> None:
    kw = {"n_train": 4, "n_val": 2, "imgsz": 64}
    make_dataset(tmp_path / "a", seed=3, **kw)
    make_dataset(tmp_path / "b", seed=3, **kw)
    make_dataset(tmp_path / "c", seed=4, **kw)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    # the data.yaml holds the absolute root, so compare all but that
    (tmp_path / "a" / "data.yaml").unlink()
    (tmp_path / "b" / "data.yaml").unlink()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_dataset_layout_and_labels(tmp_path: Path, domain: str) -> None:
    import cv2

    yaml = make_dataset(tmp_path, domain=domain, n_train=6, n_val=3, imgsz=96, seed=1)
    text = yaml.read_text()
    assert f"path: {tmp_path.resolve()}" in text
    for i, name in enumerate(DOMAINS[domain]):
        assert f"  {i}: {name}" in text
    for split, n in (("train", 6), ("val", 3)):
        images = sorted((tmp_path / "images" / split).glob("*.png"))
        assert len(images) == n
        for img in images:
            a = cv2.imread(str(img))
            assert a.shape == (96, 96, 3)
            rows = np.loadtxt(tmp_path / "labels" / split / f"{img.stem}.txt", ndmin=2)
            assert len(rows) >= 1
            assert set(rows[:, 0].astype(int)) <= set(range(len(DOMAINS[domain])))
            cx, cy, w, h = rows[:, 1:].T
            assert (w > 0).all() and (h > 0).all()
            assert (cx - w / 2 >= 0).all() and (cx + w / 2 <= 1).all()
            assert (cy - h / 2 >= 0).all() and (cy + h / 2 <= 1).all()


def test_domains_differ_in_colour_statistics(tmp_path: Path) -> None:
    import cv2

    means = {}
    for d in DOMAINS:
        make_dataset(tmp_path / d, domain=d, n_train=4, n_val=1, imgsz=64)
        means[d] = np.mean([cv2.imread(str(p)).mean() for p in (tmp_path / d / "images" / "train").glob("*.png")])
    assert means["A"] < 80 < 140 < means["B"]  # dark vs light backgrounds


def test_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="domain"):
        make_dataset(tmp_path, domain="C")
    with pytest.raises(ValueError, match="imgsz"):
        make_dataset(tmp_path, imgsz=16)
