"""LoRA through Ultralytics' several-GPU path (``device=0,1``), as far as it runs without a GPU.

Ultralytics' launcher pickles the trainer's class, ``args``, model and callbacks into a
worker file (``generate_ddp_file``) and runs ``torch.distributed.run`` on it; each worker
rebuilds the trainer from ``args`` alone. Here: the file a LoRA launcher writes carries its
LoRA state and the trainer it rebuilds injects the same layers (in process, fast); and the
whole path, launcher -> ``torch.distributed.run`` -> worker in a 1-process gloo group ->
adapter and merged checkpoints, trains (a subprocess, bounded in time). Real GPUs: ``tests/gpu``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from yolo_helpers import NETWORK_REFUSED, TINY_TRAIN, assert_no_lorakit_class, save_random_detector

IMGSZ = 64


def _lora_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora." in k}


def _options() -> Any:
    from lorakit.yolo import LoraOptions

    # none of them the default, so a worker that fell back to LoraOptions() would differ in each
    return LoraOptions(r=4, alpha=8.0, adapt_bn=False, adapter_name="ddp", loraplus_ratio=4.0, exclude="model.0.*")


@pytest.mark.parametrize("base", ["pt", "yaml"])
def test_worker_file_carries_the_lora_state_and_rebuilds_the_same_injection(tmp_path: Path, base: str) -> None:
    from ultralytics import YOLO
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_command
    from ultralytics.utils.patches import torch_load

    from lorakit.yolo import LoraDetectionTrainer, make_dataset
    from lorakit.yolo.trainer import DDP_ARGS_KEY

    pt = save_random_detector(tmp_path / "base.pt", seed=0)
    data = make_dataset(tmp_path / "A", domain="A", n_train=8, n_val=4, imgsz=IMGSZ, seed=0)
    model = str(pt) if base == "pt" else "yolo26n.yaml"
    args = {"model": model, "data": str(data), "epochs": 1, "imgsz": IMGSZ, "project": str(tmp_path / "runs")}
    launcher = LoraDetectionTrainer(overrides={**args, **TINY_TRAIN}, lora=_options())
    if base == "pt":  # as Model.train does for a checkpoint: the launcher builds (and injects) the model
        yolo = YOLO(str(pt))
        launcher.model = launcher.get_model(weights=yolo.model, cfg=yolo.model.yaml)
    with launcher.carrying_lora():
        _, file = generate_ddp_command(launcher)  # clears the run folder, as before a DDP launch
    assert not hasattr(launcher.args, DDP_ARGS_KEY)  # saved args stay plain
    try:
        script = Path(file).read_text()
        state = torch_load(Path(file).with_suffix(".pt"), map_location="cpu")
    finally:
        ddp_cleanup(launcher, file)
    # Ultralytics' worker script rebuilds the trainer from the pickled args alone (no lora= keyword)
    assert 'state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])' in script
    carried = state["args"][DDP_ARGS_KEY]
    assert carried.options == launcher.lora
    resume_base = launcher.wdir / "lora_resume" / "base.safetensors"
    assert not resume_base.exists()

    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    worker = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=state["callbacks"])
    worker.model = state["model"]
    worker.setup_model()
    assert worker.lora == launcher.lora
    assert resume_base.is_file()  # the worker (rank -1 here) wrote the resume base again
    if base == "pt":
        assert worker.lora_config == launcher.lora_config
        assert worker._lora_trainable == launcher._lora_trainable
        assert _lora_shapes(worker.model) == _lora_shapes(launcher.model)
    else:  # the worker injects itself: compare with the launcher injecting the same model
        ref = launcher.get_model(cfg="yolo26n.yaml", weights=None, verbose=False)
        assert worker.lora_config == launcher.lora_config
        assert _lora_shapes(worker.model) == _lora_shapes(ref)
    assert all(".lora." not in k or "model.0." not in k for k in worker.model.state_dict())  # exclude arrived
    assert worker.lora_config.r == 4 and worker.lora_config.alpha == 8.0


def test_a_foreign_value_under_the_ddp_key_is_a_config_error() -> None:
    import lorakit
    from lorakit.yolo import LoraDetectionTrainer
    from lorakit.yolo.trainer import DDP_ARGS_KEY

    with pytest.raises(lorakit.ConfigError, match=r"overrides\['lorakit_ddp'\]: expected a CarriedLora, got dict"):
        LoraDetectionTrainer(overrides={DDP_ARGS_KEY: {"r": 4}})


# The launcher and its worker in a subprocess: LoraYOLO.train with a trainer that takes Ultralytics'
# several-GPU branch on CPU (ddp=True and one worker in the launcher; in the worker a 1-process gloo
# group, world size 1, so RANK=0 code paths and collectives run). A callback, pickled into the worker
# like any user's, records what the worker's trainer holds.
_RUN = (
    NETWORK_REFUSED  # the launcher only starts processes; the worker joins its gloo group on localhost
    + """
import json, os
from lorakit.yolo import offline
offline.enable(sys.argv[1])
from lorakit.yolo import LoraYOLO
from lorakit.yolo.trainer import LoraDetectionTrainer

class OneWorkerDDP(LoraDetectionTrainer):
    def __init__(self, *args, **kwargs):
        # read here, not at import: cloudpickle sends this class by value with the launcher's globals
        import os
        import torch.distributed as dist
        worker = os.environ.get("LOCAL_RANK", "-1") != "-1"
        if worker and not dist.is_initialized():
            dist.init_process_group("gloo")
        super().__init__(*args, **kwargs)
        self.ddp, self.world_size = not worker, 1

def record(trainer):
    import json, os
    import torch.distributed as dist
    from ultralytics.utils.torch_utils import unwrap_model
    model = unwrap_model(trainer.model)
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    out = {
        "env": [os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")],
        "group_size": dist.get_world_size() if dist.is_initialized() else None,
        "lora": {k: getattr(trainer.lora, k) for k in ("r", "alpha", "adapt_bn", "adapter_name", "loraplus_ratio")},
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items() if ".lora." in k},
        "trainable": sorted(trainer._lora_trainable),
        "initial_lrs": lrs,
        "adapter_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
    }
    with open(os.environ["LORAKIT_TEST_RECORD"], "w") as f:
        json.dump(out, f)

opts = json.loads(sys.argv[4])
model = LoraYOLO(sys.argv[2], **opts)
model.add_callback("on_train_end", record)
model.train(trainer=OneWorkerDDP, data=sys.argv[3], **json.loads(sys.argv[5]))
t = model.trainer
print("RUN-DIR", t.save_dir)
with open(os.environ["LORAKIT_TEST_RECORD"] + ".launcher", "w") as f:
    json.dump({"shapes": {k: list(v.shape) for k, v in t.model.state_dict().items() if ".lora." in k},
               "trainable": sorted(t._lora_trainable)}, f)
"""
)


def _run_bounded(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` (output to ``log``); on timeout kill it and every process it started, by pid
    (torch.distributed.run may start its workers in sessions of their own)."""
    import psutil

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
            for p in family:
                p.send_signal(signal.SIGKILL)
            proc.wait()
            pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


@pytest.mark.slow
def test_lora_run_through_ultralytics_ddp_launch_trains_and_writes_the_adapter(tmp_path: Path) -> None:
    from lorakit.yolo import make_dataset

    pt = save_random_detector(tmp_path / "base.pt", seed=0)
    data = make_dataset(tmp_path / "A", domain="A", n_train=16, n_val=8, imgsz=IMGSZ, seed=0)
    opts = {"r": 4, "alpha": 8.0, "adapt_bn": False, "adapter_name": "ddp", "loraplus_ratio": 4.0}
    train = {**TINY_TRAIN, "epochs": 1, "imgsz": IMGSZ, "project": str(tmp_path / "runs"), "name": "ddp"}
    record = tmp_path / "record.json"
    env = {**os.environ, "LORAKIT_TEST_RECORD": str(record), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _RUN, str(tmp_path / "cfg"), str(pt), str(data), json.dumps(opts), json.dumps(train)]
    rc, out = _run_bounded(cmd, env, tmp_path / "run.log", timeout=300)
    assert rc == 0, out[-4000:]
    assert "torch.distributed.run" in out  # Ultralytics logged its DDP command: the worker path ran

    worker = json.loads(record.read_text())
    launcher = json.loads(Path(f"{record}.launcher").read_text())
    assert worker["env"] == ["0", "0", "1"] and worker["group_size"] == 1  # a torchrun worker, rank 0
    assert worker["lora"] == opts
    assert worker["shapes"] == launcher["shapes"] and worker["shapes"]  # the same LoRA layers
    assert worker["trainable"] == launcher["trainable"]
    lr0 = min(worker["initial_lrs"])
    assert worker["initial_lrs"] == pytest.approx([lr0, 4.0 * lr0])  # LoRA+ groups: B factors at 4x
    assert worker["adapter_dtypes"] == ["torch.float32"]

    weights = Path(out.split("RUN-DIR ")[1].split()[0]) / "weights"
    assert not (weights / "lora_resume").exists()  # the run finished: rank 0 removed its resume state
    for pt_file in ("last.pt", "best.pt"):
        assert_no_lorakit_class(weights / pt_file)  # merged, plain Ultralytics
    for folder in ("last_adapter", "best_adapter"):
        config = json.loads((weights / folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8.0)
        tensors = safetensors.torch.load_file(str(weights / folder / "adapter_model.safetensors"))
        b = [v for k, v in tensors.items() if "lora_B" in k]
        assert b and all(bool(torch.isfinite(v).all()) for v in b)
        assert any(bool(v.abs().sum() > 0) for v in b)  # B starts at zero: the worker trained it
