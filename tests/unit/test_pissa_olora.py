"""PiSSA / OLoRA init (lorakit.init_svd): outputs unchanged, residual + s B A = W, the factors'
maths, refusals before anything changes, and saving relative to the original base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MetaTensorError, TargetError
from lorakit.io_errors import AdapterConfigError, BaseModelMismatchError

from .io_models import state_hash

torch.set_num_threads(1)

INITS = ["pissa", "pissa_niter_2", "olora"]
X = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
# Tolerance of "unchanged" in float32: W_res + s B0 A0 reproduces W to a few ulps of |W| per entry
# (a backward-stable SVD/QR has error ~ eps * min(out, in) * ||W||, eps = 1.2e-7, min(out, in) <= 40,
# ||W||_2 <= ~1.3 here), and each output sums 40 such products: 40 * 40 * 1.2e-7 * 1.3 ~ 2.5e-4 is a
# loose worst case; measured ~2e-7. 1e-5 leaves 50x headroom and still catches any real change (>1e-3).
ATOL = 1e-5


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(40, 56)
        self.down = nn.Linear(56, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def mlp(seed: int = 0) -> Mlp:
    torch.manual_seed(seed)
    return Mlp().eval()


def cfg(init: str, **kw: object) -> lorakit.LoraConfig:
    base: dict[str, object] = {"r": 4, "alpha": 8, "targets": ["up", "down"], "init": init}
    base.update(kw)
    return lorakit.LoraConfig(**base)  # type: ignore[arg-type]


def train(m: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(X), target).backward()
        opt.step()
    m.eval()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("init", INITS)
def test_init_keeps_outputs_and_residual_plus_delta_is_w(init: str, rslora: bool) -> None:
    m = mlp()
    with torch.no_grad():
        y0 = m(X)
    W0 = {k: getattr(m, k).weight.detach().clone() for k in ("up", "down")}
    lorakit.inject(m, cfg(init, use_rslora=rslora))
    with torch.no_grad():
        torch.testing.assert_close(m(X), y0, atol=ATOL, rtol=0)
        for k, W in W0.items():
            layer = getattr(m, k)
            ad = layer.lora["default"]
            assert not torch.equal(layer.weight, W)  # the base weight is the residual now
            assert float(ad.B.abs().max()) > 0.05  # a real start, not B = 0
            torch.testing.assert_close(layer.weight + ad.scaling * ad.B @ ad.A, W, atol=ATOL, rtol=0)
            with lorakit.disabled(m):  # the residual alone: the principal part is in the adapter
                assert not torch.allclose(m(X), y0, atol=1e-3)


def test_pissa_factors_are_the_principal_part() -> None:
    m = mlp()
    W = m.up.weight.detach().double()
    lorakit.inject(m, cfg("pissa", alpha=6))  # s = 1.5
    ad = m.up.lora["default"]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # Eckart-Young: the best rank-4 approximation
    s = 6 / 4
    torch.testing.assert_close((s * ad.B @ ad.A).double(), best, atol=ATOL, rtol=0)
    # A = sqrt(S/s) Vh_r, B = U_r sqrt(S/s): A A^T = B^T B = diag(S_r / s)
    torch.testing.assert_close((ad.A @ ad.A.T).double(), torch.diag(S[:4] / s), atol=ATOL, rtol=0)
    torch.testing.assert_close((ad.B.T @ ad.B).double(), torch.diag(S[:4] / s), atol=ATOL, rtol=0)


def test_pissa_niter_approximates_the_principal_part() -> None:
    m = mlp()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a clear top-4 subspace (singular values 8..5) above noise: what trained weights have
        u, _ = torch.linalg.qr(torch.randn(56, 4, generator=g))
        v, _ = torch.linalg.qr(torch.randn(40, 4, generator=g))
        top = u @ torch.diag(torch.tensor([8.0, 7.0, 6.0, 5.0])) @ v.T
        m.up.weight.copy_(top + 0.01 * torch.randn(56, 40, generator=g))
    W = m.up.weight.detach().double()
    torch.manual_seed(0)
    lorakit.inject(m, cfg("pissa_niter_4"))
    ad = m.up.lora["default"]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    approx = (2 * ad.B @ ad.A).detach().double()
    # 4 subspace iterations with a gap sigma_5 / sigma_4 < 0.02: the subspace error is far below float32's
    torch.testing.assert_close(approx, best, atol=ATOL, rtol=0)


def test_olora_factors_are_q_and_r() -> None:
    m = mlp()
    W = m.up.weight.detach().clone()
    lorakit.inject(m, cfg("olora"))
    ad = m.up.lora["default"]
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(ad.B, Q[:, :4])
    torch.testing.assert_close(ad.A, R[:4])
    torch.testing.assert_close(ad.B.T @ ad.B, torch.eye(4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_float64_and_bfloat16_weights(init: str) -> None:
    for dtype, atol in ((torch.float64, 1e-12), (torch.bfloat16, 0.0)):
        m = mlp().to(dtype)
        W = m.up.weight.detach().clone()
        lorakit.inject(m, cfg(init))
        ad = m.up.lora["default"]
        assert m.up.weight.dtype == ad.A.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(m.up.weight + 2 * ad.B @ ad.A, W, atol=atol, rtol=0)
        else:  # bf16 (unit roundoff 2^-8): A, B and the residual are each rounded to it, as PEFT does
            delta = (2 * ad.B.float() @ ad.A.float()).detach()
            rel = (m.up.weight.float() + delta - W.float()).abs().max() / W.abs().max()
            assert float(rel) < 4 * 2**-8  # measured 0.008 = 2 roundoffs (olora), 0.004 (pissa)


def test_conv1d_transposed_weight() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    import lorakit.hf  # noqa: F401  (registers Conv1D)

    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(56, 40)).eval()  # weight (in, out) = (40, 56)
    with torch.no_grad():
        y0 = m(X)
    W = m[0].weight.detach().clone()
    for init in INITS:
        mm = nn.Sequential(Conv1D(56, 40)).eval()
        mm.load_state_dict(m.state_dict())
        lorakit.inject(mm, lorakit.LoraConfig(r=4, targets=["0"], init=init))
        ad = mm[0].lora["default"]
        assert ad.A.shape == (4, 40) and ad.B.shape == (56, 4)
        with torch.no_grad():
            torch.testing.assert_close(mm(X), y0, atol=ATOL, rtol=0)
            torch.testing.assert_close(mm[0].weight + (ad.B @ ad.A).T, W, atol=ATOL, rtol=0)


def test_peft_names_and_config_values() -> None:
    assert lorakit.LoraConfig(targets=["up"], init_lora_weights="olora").init == "olora"
    assert lorakit.LoraConfig(targets=["up"], init_lora_weights="pissa_niter_16").init == "pissa_niter_16"
    for bad in ("pissa_niter_", "pissa_niter_x", "PiSSA", "olora2", "pissa_niter_-1"):
        with pytest.raises(ConfigError, match=rf"init.*{bad}"):
            lorakit.LoraConfig(targets=["up"], init=bad)
        with pytest.raises(ConfigError, match=rf"init_lora_weights='{bad}'"):
            lorakit.LoraConfig(targets=["up"], init_lora_weights=bad)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3)
        self.emb = nn.Embedding(20, 8)


@pytest.mark.parametrize(("target", "needle"), [("conv", "ConvHandler"), ("emb", "EmbeddingHandler")])
def test_conv_and_embedding_are_refused_before_any_change(target: str, needle: str) -> None:
    torch.manual_seed(0)
    m = Mixed()
    before = state_hash(m)
    why = "a plain Linear or transformers Conv1D layer, got one handled by"
    with pytest.raises(TargetError, match=rf"{target}: PiSSA/OLoRA init needs {why} {needle}; PEFT defines"):
        lorakit.inject(m, lorakit.LoraConfig(r=4, targets=["lin", target], init="pissa"))
    assert state_hash(m) == before and not lorakit.list_adapters(m)


def test_rank_above_min_dimension_and_non_float_and_meta_are_refused() -> None:
    m = mlp()
    with pytest.raises(TargetError, match=r"down: the olora init needs r <= min\(out, in\) = 24, got r=32"):
        lorakit.inject(m, cfg("olora", rank_pattern={"down": 32}))
    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)  # a quantised stand-in
    with pytest.raises(TargetError, match=r"0: the pissa init needs a floating-point weight, got torch.int8"):
        lorakit.inject(nn.Sequential(lin), lorakit.LoraConfig(r=2, targets=["0"], init="pissa"))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(MetaTensorError, match=r"0's weight is on the meta device.*pissa init was not done"):
        lorakit.inject(meta, lorakit.LoraConfig(r=2, targets=["0"], init="pissa"))


def test_merged_layer_is_refused() -> None:
    m = mlp()
    lorakit.inject(m, cfg("kaiming"), "plain")
    lorakit.merge(m)
    with pytest.raises(TargetError, match="unmerge its adapters first"):
        lorakit.inject(m, cfg("pissa"), "p")


# -- saving ------------------------------------------------------------------------------


def _trained(init: str, **kw: object) -> tuple[Mlp, torch.Tensor]:
    m = mlp()
    lorakit.inject(m, cfg(init, **kw))
    train(m)
    with torch.no_grad():
        return m, m(X)


@pytest.mark.parametrize(
    "kw", [{}, {"use_rslora": True}, {"rank_pattern": {"down": 2}, "alpha_pattern": {"down": 3.0}}]
)
@pytest.mark.parametrize("init", INITS)
def test_original_base_save_loads_onto_the_untouched_model(tmp_path: Path, init: str, kw: dict[str, object]) -> None:
    m, y = _trained(init, **kw)
    assert not torch.allclose(y, mlp()(X).detach(), atol=1e-3)  # training moved it
    lorakit.save_adapter(m, tmp_path, original_base=True)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["init_lora_weights"] is True and raw["r"] == 8
    fresh = mlp()
    report = lorakit.load_adapter(fresh, tmp_path)
    assert report.complete and report.base_checked and report.base_matches
    assert fresh.up.lora["default"].r == 8
    with torch.no_grad():
        # fp32: y and the reload differ by the rounding of W_res + s B A versus W + s (B A - B0 A0)
        torch.testing.assert_close(fresh(X), y, atol=ATOL, rtol=0)
        for k in ("up", "down"):  # rank 2r, alpha' chosen so the scaling is the trained one
            assert float(fresh.get_submodule(k).lora["default"].scaling) == float(
                m.get_submodule(k).lora["default"].scaling
            )


def test_plain_save_belongs_to_the_residual_base(tmp_path: Path) -> None:
    m, y = _trained("pissa")
    lorakit.save_adapter(m, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    with pytest.raises(BaseModelMismatchError, match="up"):  # the untouched base: its fingerprint differs
        lorakit.load_adapter(mlp(), tmp_path)
    lorakit.delete_adapter(m, "default")  # m keeps the residual base weights
    report = lorakit.load_adapter(m, tmp_path)
    assert report.complete and report.base_matches
    with torch.no_grad():
        torch.testing.assert_close(m(X), y, atol=0, rtol=0)


def test_plain_pissa_file_without_fingerprint_is_refused(tmp_path: Path) -> None:
    """A PEFT-written PiSSA file has no base fingerprint: which base it needs cannot be checked."""
    m, _ = _trained("pissa")
    lorakit.save_adapter(m, tmp_path)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as PEFT writes it
    with pytest.raises(AdapterConfigError, match=r"init_lora_weights='pissa' changes the base weights.*original_base"):
        lorakit.load_adapter(mlp(), tmp_path)


def test_original_base_refusals(tmp_path: Path) -> None:
    m, _ = _trained("kaiming")
    with pytest.raises(ConfigError, match=r"original_base=True: it was not made by a PiSSA/OLoRA init.*'kaiming'"):
        lorakit.save_adapter(m, tmp_path, original_base=True)
    m, _ = _trained("pissa")
    lorakit.inject(m, cfg("olora"), "second")  # changes the base weights again
    with pytest.raises(ConfigError, match="up: the base weight is not the residual"):
        lorakit.save_adapter(m, tmp_path, "default", original_base=True)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    lorakit.save_adapter(m, tmp_path, "second", original_base=True)  # relative to the base before its own init


def test_reinjecting_a_name_forgets_the_old_init(tmp_path: Path) -> None:
    m, _ = _trained("pissa")
    lorakit.delete_adapter(m, "default")
    lorakit.inject(m, cfg("kaiming"))
    with pytest.raises(ConfigError, match="not made by a PiSSA/OLoRA init"):
        lorakit.save_adapter(m, tmp_path, original_base=True)


def test_merge_and_unload_keep_the_trained_model_unload_leaves_the_residual() -> None:
    m, y = _trained("pissa")
    lorakit.merge_and_unload(m)
    with torch.no_grad():
        torch.testing.assert_close(m(X), y, atol=ATOL, rtol=0)
    m, _ = _trained("pissa")
    residual = m.up.weight.detach().clone()
    lorakit.unload(m)
    assert torch.equal(m.up.weight, residual)  # as in PEFT: the init's change to the base stays
