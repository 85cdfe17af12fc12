"""``loss.png`` of ``lorakit hf train``."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

from ..io_format import atomic_write


def plot_losses(out: Path, losses: list[float], evals: list[dict[str, float]]) -> None:
    """``out/loss.png``: training loss per step, eval loss at each evaluation (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    png = BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "loss.png", png.getvalue())
