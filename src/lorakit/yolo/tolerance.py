"""How close two float32 results must be to count as equal, from their scale and precision.

Two float32 computations of the same function that differ only in the order of
their operations (a merged weight instead of weight + LoRA branch, ONNX Runtime's
kernels instead of PyTorch's, Conv+BN fused or not) differ by rounding. Each
operation is exact to half a unit in the last place (ulp), a relative
``eps = 2**-23`` (1.2e-7), and the rounding of a deep network's activations
accumulates to some ulps *of the largest values involved*, not of each output
element: a logit near 0 is the difference of activations of size ~10, and a box
edge at 2 px is an anchor at 150 px minus a distance. So the bound is a number of
ulps of the compared output's largest magnitude, and, where the output has units
that matter (pixels, probabilities), never tighter than a floor in those units
below which no difference can change a result. The rounding depends on which
kernels the CPU picks (vector width, FMA), so a bound must leave room for any
x86-64 CPU, not just the one it was measured on.

A bound of zero (``Tolerance.exact``) is for results computed by the very same
operations on the very same values in one process: they are bitwise equal on any
CPU, and any difference is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the demo's parent process imports this module and never needs torch
    import torch

FP32_EPS = 2.0**-23  # float32 machine epsilon (torch.finfo(torch.float32).eps): the ulp of 1.0


@dataclass(frozen=True)
class Tolerance:
    """``max |got - want| <= max(ulps * FP32_EPS * max |want|, floor)``.

    Args:
        ulps: rounding allowed, in ulps of the reference's largest magnitude.
        floor: an absolute bound in the output's ``unit`` that is always allowed
            (a difference below it changes nothing that matters).
        unit: the unit of ``floor``, for messages (``"px"``, ``"probability"``).
        why: a short reason for the bound, for messages (the demo prints it with its exact checks).
    """

    ulps: float
    floor: float = 0.0
    unit: str = ""
    why: str = ""

    @classmethod
    def exact(cls, why: str) -> Tolerance:
        """Bitwise equality: the same operations on the same values."""
        return cls(0.0, 0.0, "", why)

    def bound(self, scale: float) -> float:
        """The largest allowed ``|got - want|`` for a reference whose largest magnitude is ``scale``."""
        return max(self.ulps * FP32_EPS * scale, self.floor)

    def describe(self, scale: float | None = None) -> str:
        """The rule in words, with the bound it gives at ``scale`` when one is given."""
        if self.ulps == 0 and self.floor == 0:
            return "exact (bitwise)"
        unit = f" {self.unit}" if self.unit else ""
        if scale is None:  # no "|" in the text: it goes into Markdown table cells
            return f"max({self.ulps:g} ulp of the reference's largest magnitude, {self.floor:g}{unit})"
        return f"max({self.ulps:g} ulp of scale {scale:.3g}, {self.floor:g}{unit}) = {self.bound(scale):.3g}{unit}"


def compare(got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> dict[str, Any]:
    """Compare ``got`` with the reference ``want`` under ``tol``.

    Returns a dict: ``ok``, ``max_abs_diff``, ``scale`` (``max |want|``), ``tolerance``
    (the bound at that scale) and ``rule`` (:meth:`Tolerance.describe`). A NaN or Inf in
    either tensor fails (its difference is not a number below the bound), as does a shape mismatch.
    """
    import torch

    if got.shape != want.shape:
        return {"ok": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}", "rule": tol.describe()}
    got, want = got.detach().double(), want.detach().double()  # float64: the comparison adds no rounding
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    bound = tol.bound(scale)
    finite = bool(torch.isfinite(got).all() and torch.isfinite(want).all())
    ok = finite and (diff == 0.0 if bound == 0.0 else diff <= bound)
    return {"ok": ok, "max_abs_diff": diff, "scale": scale, "tolerance": bound, "rule": tol.describe(scale)}


def compare_parts(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tols: dict[str, Tolerance]
) -> dict[str, Any]:
    """:func:`compare` for each named part (boxes, scores, ...: each has its own scale and units).

    Returns ``ok`` (every part passed), the largest ``max_abs_diff`` and, per part,
    ``<part>_max_abs_diff``, ``<part>_tolerance`` and ``<part>_rule``.
    """
    out: dict[str, Any] = {"ok": True, "max_abs_diff": 0.0}
    for name, tol in tols.items():
        c = compare(got[name], want[name], tol)
        out["ok"] = out["ok"] and c["ok"]
        if "error" in c:
            out[f"{name}_error"] = c["error"]
            continue
        out["max_abs_diff"] = max(out["max_abs_diff"], c["max_abs_diff"])
        out.update({f"{name}_max_abs_diff": c["max_abs_diff"], f"{name}_tolerance": c["tolerance"]})
        out[f"{name}_rule"] = c["rule"]
    return out
