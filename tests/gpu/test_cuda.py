"""The same arithmetic on a CUDA device: the fused Linear, convs, dropout, mixed batches,
saving and loading, merging, and a reduced-precision step.

Skipped where torch sees no CUDA device (this repository's CI machine has none); run
them on a machine with one: ``pytest tests/gpu``. TF32 is switched off so fp32 products
are compared at fp32 precision.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.fused import LoraLinearFn, dropped_positions

from ..contract.test_mixed import _alone
from ..unit.test_fused import _mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows", [4, 400])  # activation form; weight form (p=0, 400 > 1.5 * 48)
def test_fused_linear_matches_autograd_on_cuda(p: float, rows: int) -> None:
    torch.manual_seed(0)
    x0 = torch.randn(rows, 48, dtype=torch.float64, device=DEV, requires_grad=True)
    x = x0 * 1.0  # an activation, so dropout takes the in-place path
    w = torch.randn(40, 48, dtype=torch.float64, device=DEV)
    b = torch.randn(40, dtype=torch.float64, device=DEV)
    A = torch.randn(8, 48, dtype=torch.float64, device=DEV, requires_grad=True)
    B = torch.randn(40, 8, dtype=torch.float64, device=DEV, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, device=DEV)
    before = x.detach().clone()
    y = LoraLinearFn.apply(x, w, b, A, B, s, p, 99)
    assert torch.equal(x.detach(), before)  # dropout put the dropped values back
    xd = x * _mask(x.shape, p, 99, DEV) if p > 0 else x
    ref = F.linear(x, w, b) + s * F.linear(F.linear(xd, A), B)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-10)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x0, A, B), g, retain_graph=True)  # x0 * 1.0 is shared with ref
    want = torch.autograd.grad(ref, (x0, A, B), g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-9)


def test_dropped_positions_on_cuda_are_reproducible_and_at_rate() -> None:
    n, p = 200_000, 0.1
    a = dropped_positions(n, p, 7, DEV)
    assert a.device.type == "cuda"
    assert torch.equal(a, dropped_positions(n, p, 7, DEV))
    assert not torch.equal(a, dropped_positions(n, p, 8, DEV))
    assert bool((a[1:] > a[:-1]).all()) and int(a[0]) >= 0 and int(a[-1]) < n
    assert abs(a.numel() / n - p) < 0.005  # sd of the rate is 0.00067


def _tiny_llama(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to(DEV)


def test_train_save_load_merge_a_llama_on_cuda(tmp_path: Path) -> None:
    model = _tiny_llama()
    lorakit.inject(model, LoraConfig(r=8, alpha=16, dropout=0.05, targets=["re:.*(q|k|v|o|gate|up|down)_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (4, 32), device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    fresh = _tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        lorakit.merge(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_step_on_cuda(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).to(DEV, dtype)
    lorakit.inject(model, LoraConfig(r=8, dropout=0.1, targets=["0", "2"], init="random"))
    model.train()
    x = torch.randn(256, 64, device=DEV, dtype=dtype)
    model(x).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == dtype and bool(g.isfinite().all()) for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("mode", ["weight", "activation"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_conv_forms_on_cuda_equal_the_merged_conv(mode: str, dropout: float) -> None:
    handler = lorakit.handler_for(nn.Conv2d)
    old = handler.mode
    handler.mode = mode
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(16, 4, 1)).to(DEV)
        lorakit.inject(model, LoraConfig(r=4, dropout=dropout, target_types=["Conv2d"], init="random"))
        x = torch.randn(2, 8, 12, 12, device=DEV, requires_grad=True)
        model.train()
        y = model(x)
        y.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.eval()
        with torch.no_grad():
            unmerged = model(x)
            lorakit.merge(model)
            torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    finally:
        handler.mode = old


@pytest.mark.parametrize("names", [["a", None, "b", "a", "c", "c"], ["a", "a", "a", "a", "b", None]])
def test_mixed_batch_on_cuda_equals_per_sample(names: list[str | None]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(DEV).eval()
    for name, r in [("a", 2), ("b", 4), ("c", 3)]:
        lorakit.inject(model, LoraConfig(r=r, alpha=2.0 * r, targets=["0", "2"], init="random"), name)
    x = torch.randn(len(names), 5, 16, device=DEV)
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            mixed = model(x)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i : i + 1], _alone(model, x, i, name), rtol=1e-5, atol=1e-5)


def test_yolo_lora_epoch_with_amp_keeps_adapters_fp32_and_finite(tmp_path: Path) -> None:
    # Ultralytics' default on a GPU: amp=True, fp16 autocast with a GradScaler over fp32 parameters.
    pytest.importorskip("ultralytics")
    from lorakit.yolo import offline

    offline.enable()  # before ultralytics is imported (or with the config dir it was imported with)
    import safetensors.torch

    from lorakit.yolo import LoraYOLO, make_dataset

    data = make_dataset(tmp_path / "A", domain="A", n_train=16, n_val=8, imgsz=64, seed=0)
    model = LoraYOLO("yolo26n.yaml", r=8)
    model.train(
        data=str(data), epochs=1, imgsz=64, batch=8, nbs=8, warmup_epochs=0, workers=0, plots=False,
        device=0, amp=True, project=str(tmp_path / "runs"), verbose=False, seed=0,
    )  # fmt: skip
    t = model.trainer
    # check_amp may find a GPU unfit for AMP and switch it off; the test would then prove nothing
    assert t.amp is True and t.scaler.is_enabled(), "AMP was switched off (see Ultralytics' AMP check above)"
    live = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert live and {p.dtype for p in live.values()} == {torch.float32}
    assert all(p.device.type == "cuda" and bool(p.isfinite().all()) for p in live.values())
    ema = {k: v for k, v in t.ema.ema.state_dict().items() if ".lora." in k}
    assert ema and {v.dtype for v in ema.values()} == {torch.float32}
    assert all(bool(v.isfinite().all()) for v in ema.values())
    tensors = safetensors.torch.load_file(str(Path(t.last_adapter) / "adapter_model.safetensors"))
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    assert lora and {v.dtype for v in lora.values()} == {torch.float32}
    assert all(bool(v.isfinite().all()) for v in lora.values())
    assert any(bool(v.abs().sum() > 0) for k, v in lora.items() if "lora_B" in k)


def test_tensors_on_two_devices_encode_as_on_one() -> None:
    """A model spread over devices (device_map, offloading) saves tensors from both: lorakit's writer
    gathers each dtype in one cat, which needs one device."""
    import safetensors.torch

    from lorakit.io_format import checksum, encode_tensors, safetensors_bytes

    tensors = {"a": torch.randn(3, 4, device=DEV), "b": torch.randn(5), "c": torch.randn(2, device=DEV).half()}
    encoded = encode_tensors(tensors)
    assert encoded is not None and encoded.checksums() == {k: checksum(v) for k, v in tensors.items()}
    back = safetensors.torch.load(safetensors_bytes(tensors, encoded=encoded))
    assert all(torch.equal(back[k], v.cpu()) for k, v in tensors.items())
