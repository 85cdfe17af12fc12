"""``lorakit serve yolo``: a real uvicorn server on 127.0.0.1, real HTTP requests (httpx).

Every answer is compared with the offline answer of its adapter (``LoraYOLO(base, adapter=...).predict``)
and must name the adapter and the version (content sha256) that answered."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import lorakit
from lorakit.serve import content_version
from lorakit.serve.app import in_thread as running

from .clients import run_clients
from .yolo_world import IMGSZ, b64, make_detector_adapter, offline_answers, png_images

pytestmark = pytest.mark.slow
CONF = 0.0  # random weights score low: keep every box (max_det of them)
MAX_DET = 20
MAX_BODY = 128 * 1024  # five test images (16 KiB each in base64) fit
NAMES = {"cats": {0: "cat", 1: "dog"}, "cars": {0: "car", 1: "truck"}, "birds": {0: "owl", 1: "crow"}}


def _version(folder: Path) -> str:
    return content_version(lorakit.read_adapter_files(folder))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parents[1] / "yolo"))
    from yolo_helpers import save_random_detector

    root = tmp_path_factory.mktemp("serve_yolo")
    base = save_random_detector(root / "base.pt", seed=0)
    store = root / "store"
    for i, (name, names) in enumerate(NAMES.items()):
        make_detector_adapter(base, store / name, seed=i, names=names)
    spare = make_detector_adapter(base, root / "spare", seed=7, names={0: "new", 1: "newer"})
    images = png_images(3)
    offline = {name: offline_answers(base, store / name, images, CONF, MAX_DET) for name in NAMES}
    offline["spare"] = offline_answers(base, spare, images, CONF, MAX_DET)
    versions = {name: _version(store / name) for name in NAMES}
    versions["spare"] = _version(spare)
    return SimpleNamespace(
        root=root, base=base, store=store, spare=spare, images=images, offline=offline, versions=versions
    )


@pytest.fixture(scope="module")
def url(world: SimpleNamespace) -> Iterator[str]:
    from lorakit.serve.yolo import YoloService, yolo_server

    service = YoloService(world.base, world.store, budget_bytes=2**30, pinned=("cats",), imgsz=IMGSZ, max_images=4)
    service.store.preload()
    with running(yolo_server(service, max_body=MAX_BODY).app) as base_url:
        yield base_url


def _same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal detections: the same classes in the same order, boxes and scores to float32 rounding
    (the server runs the very same fused model; JSON carries float32 values exactly, so this is slack)."""
    if got["classes"] != want["classes"] or len(got["boxes"]) != len(want["boxes"]):
        return False
    flat = [*sum(got["boxes"], []), *got["scores"]], [*sum(want["boxes"], []), *want["scores"]]
    pairs = zip(*flat, strict=True)
    return all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in pairs)


def _detect(client: httpx.Client, url: str, adapter: Any, images: list[bytes]) -> httpx.Response:
    return client.post(
        f"{url}/v1/detect",
        json={"adapter": adapter, "images": [b64(i) for i in images], "conf": CONF, "max_det": MAX_DET},
    )


def test_adapters_answer_differently(world: SimpleNamespace) -> None:
    """The cross-talk checks below are not vacuous: every adapter gives other detections."""
    answers = [world.offline[n][0] for n in (*NAMES, "spare")]
    for i, a in enumerate(answers):
        assert all(not _same(a, b) for b in answers[i + 1 :])


def test_concurrent_clients_get_their_adapters_answers(world: SimpleNamespace, url: str) -> None:
    """6 clients x 3 adapters x 4 requests each, in a shuffled order: every answer is its adapter's."""
    jobs = [(name, k % len(world.images)) for name in NAMES for k in range(8)]
    random.Random(0).shuffle(jobs)
    failures: list[str] = []

    def client(part: list[tuple[str, int]]) -> None:
        with httpx.Client(timeout=60) as c:
            for name, k in part:
                r = _detect(c, url, name, [world.images[k]])
                body = r.json()
                ok = (
                    r.status_code == 200
                    and body["adapter"] == name == r.headers["X-Lorakit-Adapter"]
                    and body["adapter_version"] == world.versions[name] == r.headers["X-Lorakit-Adapter-Version"]
                    and body["names"] == {str(k): v for k, v in NAMES[name].items()}
                    and _same(body["results"][0], world.offline[name][k])
                    and body["results"][0]["labels"] == [NAMES[name][c] for c in body["results"][0]["classes"]]
                )
                if not ok:
                    failures.append(f"{name} image {k}: {r.status_code} {r.text[:300]}")

    run_clients(client, jobs)
    assert not failures

    with httpx.Client(timeout=60) as c:  # several images in one request: one result each, in order
        body = _detect(c, url, "cars", world.images).json()
        assert [_same(got, want) for got, want in zip(body["results"], world.offline["cars"], strict=True)] == [
            True
        ] * 3
        metrics = c.get(f"{url}/metrics").text
        health = c.get(f"{url}/health").json()
    assert 'lorakit_requests_total{endpoint="/v1/detect",adapter="cats",status="200"}' in metrics
    assert "lorakit_cache_hits_total" in metrics and "lorakit_request_seconds_bucket" in metrics
    assert f'lorakit_adapter_info{{adapter="cars",version="{world.versions["cars"]}"}} 1' in metrics
    assert health["status"] == "ok" and health["adapters_loaded"] >= 3


def test_bad_input_is_answered_and_the_server_keeps_serving(world: SimpleNamespace, url: str) -> None:
    outside = world.root / "outside"
    shutil.copytree(world.store / "cars", outside, dirs_exist_ok=True)
    link = world.store / "escape"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    corrupt = world.store / "corrupt"
    shutil.copytree(world.store / "cars", corrupt, dirs_exist_ok=True)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: a save that did not finish
    img = [world.images[0]]
    with httpx.Client(timeout=60) as c:
        post = f"{url}/v1/detect"
        as_json = {"content-type": "application/json"}
        broken, cut = b64(b"GIF89a broken"), b'{"adapter": "cats", "images": ['  # not an image; JSON cut short
        cases: list[tuple[str, httpx.Response, int, str]] = [
            ("unknown", _detect(c, url, "dogs", img), 404, "'cars'"),
            ("dotdot", _detect(c, url, "../store/cats", img), 400, "no '..'"),
            ("absolute", _detect(c, url, str(world.store / "cats"), img), 400, "plain folder name"),
            ("symlink out", _detect(c, url, "escape", img), 400, "leads out of the store"),
            ("not a name", _detect(c, url, 7, img), 400, "adapter"),
            ("bad json", c.post(post, content=cut, headers=as_json), 400, "not valid JSON"),
            ("not an object", c.post(post, json=["cats"]), 400, "JSON object"),
            ("no images", c.post(post, json={"adapter": "cats"}), 400, "images"),
            ("bad base64", c.post(post, json={"adapter": "cats", "images": ["%%%"]}), 400, "base64"),
            ("not an image", c.post(post, json={"adapter": "cats", "images": [broken]}), 400, "images[0]"),
            ("bad conf", c.post(post, json={"adapter": "cats", "images": [b64(img[0])], "conf": "high"}), 400, "conf"),
            ("too big", c.post(post, content=b"x" * (MAX_BODY + 1), headers=as_json), 413, "limit"),
            ("too many images", _detect(c, url, "cats", img * 5), 413, "max_images"),
            ("corrupt file", _detect(c, url, "corrupt", img), 500, "adapter_model.safetensors"),
        ]  # fmt: skip
        for what, r, status, text in cases:
            assert r.status_code == status, (what, r.text)
            assert text in r.json()["error"]["message"], (what, r.text)
            assert _detect(c, url, "cars", img).status_code == 200, what  # still serving
        unknown = cases[0][1].json()["error"]
        assert set(NAMES) <= set(unknown["available"]) and "escape" not in unknown["available"]
        # the corrupt adapter fixed: served on its next request (a failed load is not cached)
        shutil.rmtree(corrupt)
        shutil.copytree(world.store / "cars", corrupt)
        assert _detect(c, url, "corrupt", img).json()["adapter_version"] == world.versions["cars"]
        assert 'lorakit_requests_total{endpoint="/v1/detect",adapter="",status="404"} 1' in c.get(f"{url}/metrics").text


def test_hot_reload_under_load_never_mixes_versions(world: SimpleNamespace, url: str) -> None:
    """While clients hammer adapter ``hot``, its folder is saved over with another adapter and back: every
    answer is entirely the old adapter's or entirely the new one's, and names the version it came from."""
    hot = world.store / "hot"
    lorakit.copy_adapter(world.store / "birds", hot)
    by_version = {world.versions["birds"]: world.offline["birds"], world.versions["spare"]: world.offline["spare"]}
    seen: dict[str, int] = {}
    failures: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                k = rng.randrange(len(world.images))
                r = _detect(c, url, "hot", [world.images[k]])
                body = r.json()
                version = body.get("adapter_version")
                if (
                    r.status_code != 200
                    or version not in by_version
                    or not _same(body["results"][0], by_version[version][k])
                ):
                    failures.append(f"{r.status_code} {version} image {k}: {r.text[:200]}")
                seen[version] = seen.get(version, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for src in (world.spare, world.store / "birds", world.spare):
            lorakit.copy_adapter(src, hot)  # an atomic save, while requests are in flight
            want = _version(src)
            before, deadline = seen.get(want, 0), time.monotonic() + 60
            while seen.get(want, 0) < before + 3 and time.monotonic() < deadline and not failures:
                time.sleep(0.05)  # until the new version has answered a few requests
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures[:5]
    assert set(seen) == set(by_version), seen  # both versions answered: the reload happened under load
    with httpx.Client(timeout=60) as c:
        assert _detect(c, url, "hot", world.images[:1]).json()["adapter_version"] == world.versions["spare"]


def test_cli_serves_and_stops_gracefully(world: SimpleNamespace) -> None:
    """``lorakit serve yolo`` in a subprocess: it answers, and SIGTERM lets a request in flight finish."""
    from .conftest import LOOPBACK

    with socket.socket() as s:
        s.bind((LOOPBACK[0], 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", "yolo", f"model={world.base}", f"adapters={world.store}",
           f"port={port}", f"imgsz={IMGSZ}", "pin=cats", "log_level=warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=60) as c:
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                try:
                    if c.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = _detect(c, url, "cats", world.images[:1])
            assert r.status_code == 200 and _same(r.json()["results"][0], world.offline["cats"][0])
            # a request in flight (a miss: it loads "cars") when SIGTERM arrives still gets its answer
            answer: list[httpx.Response] = []
            t = threading.Thread(
                target=lambda: answer.append(_detect(httpx.Client(timeout=60), url, "cars", world.images[:1]))
            )
            t.start()
            while "lorakit_cache_misses_total 2" not in c.get(f"{url}/metrics").text:  # "cars" is loading
                assert t.is_alive() and time.monotonic() < deadline, answer
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            t.join(60)
        assert answer and answer[0].status_code == 200, answer
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it stopped on
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
