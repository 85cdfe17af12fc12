"""The fused LoRA Linear: same values and gradients as plain autograd, less saved memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.fused import LoraLinearFn, dropped_positions


def _reference(x, w, b, A, B, s, mask):
    xd = x * mask if mask is not None else x
    return F.linear(x, w, b) + s * F.linear(F.linear(xd, A), B)


def _mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    keep = torch.ones(shape, dtype=torch.float64, device=device).reshape(-1)
    keep[dropped_positions(keep.numel(), p, seed, keep.device)] = 0
    return (keep / (1 - p)).reshape(shape)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("train_base", [False, True])
# in=7, out=6, MERGE_ROWS=1.5: 2 rows take the activation form both ways, 10 the weight
# form in backward only (10 > 9 but not > 10.5), 40 the weight form both ways (p=0)
@pytest.mark.parametrize("rows", [2, 10, 40])
def test_values_and_gradients_match_autograd(p: float, bias: bool, train_base: bool, rows: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows // 2, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=train_base)
    b = torch.randn(6, dtype=torch.float64, requires_grad=train_base) if bias else None
    A = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64)
    seed = 1234
    y = LoraLinearFn.apply(x, w, b, A, B, s, p, seed)
    mask = _mask(x.shape, p, seed) if p > 0 else None
    ref = _reference(x, w, b, A, B, s, mask)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(ref)
    inputs = [t for t in (x, w, b, A, B) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, e in zip(got, want, strict=True):
        assert torch.allclose(a, e, atol=1e-10)
    if p > 0 and x.numel() >= 70:  # the mask really drops something, with the expected rate
        assert 0.1 < float((mask == 0).double().mean()) < 0.5


def test_dropout_on_a_shared_activation_restores_it_and_matches_autograd() -> None:
    """Dropout zeroes an activation's dropped elements in place for one GEMM and writes them
    back: two layers reading the same x (like q and k) see it whole, its version counter
    is untouched (autograd raises no in-place error), and all gradients are right."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    x = x0 * 1.0  # an activation: made by autograd, so the in-place path is taken
    before, version = x.detach().clone(), x._version
    ws = [torch.randn(5, 9, dtype=torch.float64) for _ in range(2)]
    As = [torch.randn(3, 9, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    Bs = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    s = torch.tensor(0.8, dtype=torch.float64)
    ys = [LoraLinearFn.apply(x, ws[i], None, As[i], Bs[i], s, 0.4, 11 + i) for i in range(2)]
    loss = ys[0].sum() + (ys[1] ** 2).sum()
    got = torch.autograd.grad(loss, [x0, *As, *Bs])
    assert torch.equal(x.detach(), before) and x._version == version
    refs = [_reference(x0, ws[i], None, As[i], Bs[i], s, _mask(x0.shape, 0.4, 11 + i)) for i in range(2)]
    want = torch.autograd.grad(refs[0].sum() + (refs[1] ** 2).sum(), [x0, *As, *Bs])
    for a, e in zip(got, want, strict=True):
        assert torch.allclose(a, e, atol=1e-10)


def test_dropout_saves_no_copy_of_the_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True)
    w, A, B = torch.randn(128, 256), torch.randn(8, 256, requires_grad=True), torch.randn(128, 8, requires_grad=True)
    s = torch.tensor(2.0)
    sizes: dict[int, int] = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LoraLinearFn.apply(x, w, None, A, B, s, 0.1, 7)
    params = {t.untyped_storage().data_ptr() for t in (w, A, B, s)}
    activations = sum(n for ptr, n in sizes.items() if ptr not in params)
    # x itself (shared with the caller) + h (64 x 8); no dropped copy, no mask
    assert activations == x.numel() * 4 + 64 * 8 * 4


def _storages(ts) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if t is not None}


@pytest.mark.parametrize(
    "make",
    [
        lambda g, u: F.silu(g) * u,  # a gated MLP's down_proj input; MulBackward0 keeps silu(g) and u
        lambda g, u: F.gelu(g),  # BERT's output dense input; GeluBackward0 keeps g
        lambda g, u: F.gelu(g, approximate="tanh"),
    ],
    ids=["silu-times-up", "gelu", "gelu-tanh"],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("rows", [4, 40])  # in=7: activation form; 40 > 1.5 * 7: weight form (p=0)
@pytest.mark.parametrize("train_base", [False, True])
def test_input_is_rebuilt_from_what_its_own_backward_keeps(make, p: float, rows: int, train_base: bool) -> None:
    """The layer keeps the factors of ``silu(g) * u`` (or the input of ``gelu``), which x's own
    backward keeps anyway, instead of x; values and gradients are unchanged."""
    torch.manual_seed(0)
    g = torch.randn(rows, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(rows, 7, dtype=torch.float64, requires_grad=True)
    x = make(g, u)
    fn = x.grad_fn
    sources = [fn._saved_self, fn._saved_other] if fn.name() == "MulBackward0" else [g]
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=train_base)
    A = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.9, dtype=torch.float64)
    y = LoraLinearFn.apply(x, w, None, A, B, s, p, 5)
    kept = _storages(y.grad_fn.saved_tensors)
    assert x.untyped_storage().data_ptr() not in kept
    assert _storages(sources) <= kept
    ref = _reference(make(g, u), w, None, A, B, s, _mask(x.shape, p, 5) if p > 0 else None)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    cot = torch.randn_like(ref)
    inputs = [g, u, A, B, *([w] if train_base else [])]
    got = torch.autograd.grad(y, inputs, cot, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, cot, allow_unused=True)
    for a, e in zip(got, want, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_inputs_are_kept_as_they_are_under_saved_tensor_hooks_and_for_other_ops() -> None:
    """Checkpointing and offloading run saved_tensors_hooks; reading a factor would unpack it,
    so x itself is kept then. A product that broadcasts, any other op, or a product whose
    node was already through a backward keeps x too."""
    torch.manual_seed(0)
    w, A, B = torch.randn(5, 4), torch.randn(2, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    s = torch.tensor(1.0)
    a, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = a * b
        y = LoraLinearFn.apply(x, w, None, A, B, s, 0.0, 0)
    assert x.untyped_storage().data_ptr() in _storages(y.grad_fn.saved_tensors)
    for x in (a * b[:1], a + b, torch.tanh(a)):  # broadcast product, sum, other op
        y = LoraLinearFn.apply(x, w, None, A, B, s, 0.0, 0)
        assert x.untyped_storage().data_ptr() in _storages(y.grad_fn.saved_tensors)
    x = a * b
    x.sum().backward()  # frees what x's node kept: reading it now raises inside torch
    y = LoraLinearFn.apply(x, w, None, A, B, s, 0.0, 0)
    assert x.untyped_storage().data_ptr() in _storages(y.grad_fn.saved_tensors)


def test_dropped_positions_are_bernoulli() -> None:
    """Per-position rate p, count mean n p and variance n p (1 - p), positions unique and in range."""
    n, p, trials = 400, 0.3, 3000
    hits = torch.zeros(n)
    counts = []
    for seed in range(trials):
        pos = dropped_positions(n, p, seed, torch.device("cpu"))
        assert pos.numel() == pos.unique().numel() and int(pos.min()) >= 0 and int(pos.max()) < n
        hits[pos] += 1
        counts.append(pos.numel())
    rate = hits / trials
    # each rate has std sqrt(p(1-p)/trials) = 0.0084; 5 std over 400 positions
    assert float((rate - p).abs().max()) < 5 * (p * (1 - p) / trials) ** 0.5
    c = torch.tensor(counts, dtype=torch.float64)
    assert abs(float(c.mean()) - n * p) < 5 * (n * p * (1 - p) / trials) ** 0.5
    assert abs(float(c.var()) / (n * p * (1 - p)) - 1) < 0.1
    same = dropped_positions(n, p, 7, torch.device("cpu"))
    assert torch.equal(same, dropped_positions(n, p, 7, torch.device("cpu")))


def test_adjacent_drops_are_independent() -> None:
    n, p = 200_000, 0.2
    pos = dropped_positions(n, p, 3, torch.device("cpu"))
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    pair = float((dropped[:-1] & dropped[1:]).double().mean())
    assert abs(pair - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5


def test_compiles_with_fullgraph_and_matches_eager() -> None:
    """No graph break in the LoRA layer (dropout 0): torch.compile(fullgraph=True) works."""
    import lorakit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_types=["Linear"], init="random"))
    x = torch.randn(8, 16)
    eager = model(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), [model[0].lora["default"].A])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), [model[0].lora["default"].A])
    assert torch.allclose(out, eager, atol=1e-6)
    assert torch.allclose(grad, eager_grad, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 7, 300])  # 1 and 7: activation form; 300 * 56 > 2 * 32 * 24: weight form
def test_inference_forms_equal_merged_and_zero_b_is_bitwise_base(tokens: int) -> None:
    import copy

    from torch import nn

    import lorakit

    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    x = torch.randn(2, tokens, 32)
    zero = copy.deepcopy(base)
    lorakit.inject(zero, lorakit.LoraConfig(r=4, targets=("re:.*",), target_types=(nn.Linear,)))
    live = copy.deepcopy(base)
    lorakit.inject(live, lorakit.LoraConfig(r=4, alpha=8, targets=("re:.*",), target_types=(nn.Linear,), init="random"))
    merged = lorakit.merge_and_unload(copy.deepcopy(live))
    with torch.no_grad():
        assert torch.equal(zero(x), base(x))
        torch.testing.assert_close(live(x), merged(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(live(x), base(x))
    with torch.inference_mode():
        torch.testing.assert_close(live(x), merged(x), atol=1e-5, rtol=1e-5)
    y = live(x)  # grad mode: the fused autograd node, same values
    torch.testing.assert_close(y.detach(), merged(x).detach(), atol=1e-5, rtol=1e-5)
