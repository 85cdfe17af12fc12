"""Which layers of an Ultralytics detector get LoRA by default, and why.

A YOLO detector is almost all ``nn.Conv2d`` (YOLO26 has no ``nn.Linear``; its
attention ``qkv``/``proj`` are 1x1 convs). :func:`detector_config` adapts
every conv except three kinds, each left *frozen* (not trained fully):

* **depthwise and other grouped convs** (``groups > 1``: ``DWConv`` in the
  Detect class branch, the attention ``pe``). LoRA on a grouped conv needs
  ``r % groups == 0``, and a depthwise 3x3 conv has only 9 weights per channel,
  so a low-rank update buys nothing there;
* **the stem**, the convs that read the image (``in_channels`` = the image
  channels, 3 -> 16 in yolo26n: 432 weights, while r=8 LoRA would need 344);
* **thin layers**, where rank-``r`` LoRA would hold more numbers than the layer
  itself (``max_fraction=1.0``): the 1x1 output convs of the head (4 box
  outputs, nc class outputs) and, at r=8 in yolo26n, ``model.2.m.0.cv1``
  (16 -> 8). Training such a layer fully would be cheaper. LoRA is not a
  "0.1 %" method on small YOLOs: in yolo26n many 16-32 channel convs get
  LoRA of 50-100 % of their size;
* the fixed ``dfl`` conv (older heads; YOLO26 has ``reg_max=1`` and none).

Both YOLO26 heads (``cv2``/``cv3`` one-to-many, used by training and NMS
export, and ``one2one_cv2``/``one2one_cv3``, used by ``nms=False`` export) are
adapted the same way. When the class count changes, the re-initialised class
convs (:func:`class_convs`) are trained fully instead (frozen random class
convs give ~0 mAP).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..config import LoraConfig


def head_of(model: nn.Module) -> nn.Module | None:
    """The detection head (last layer of ``model.model``), or ``None``."""
    layers = getattr(model, "model", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers):
        return layers[-1]
    return None


def class_convs(model: nn.Module) -> list[str]:
    """Paths of the head's final class convs: ``cv3[i][-1]`` and ``one2one_cv3[i][-1]``.

    Their output count is the class count, so they are re-initialised when a
    model is fine-tuned on a dataset with another class count.
    """
    head = head_of(model)
    if head is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    paths = []
    for attr in ("cv3", "one2one_cv3"):
        branches = getattr(head, attr, None)
        if isinstance(branches, nn.ModuleList):
            for branch in branches:
                last = branch[-1] if isinstance(branch, nn.Sequential) else None
                if isinstance(last, nn.Conv2d):
                    paths.append(names[id(last)])
    return paths


def lora_fraction(conv: nn.Conv2d, r: int) -> float:
    """Rank-``r`` LoRA parameters of ``conv`` over its weight count: ``r (cin/g k^2 + cout/g) / (cout cin/g k^2)``."""
    k = conv.weight[0, 0].numel()
    g = conv.groups
    lora = r * (conv.in_channels // g * k + conv.out_channels // g)
    return lora / conv.weight.numel()


def default_exclusions(model: nn.Module, r: int, max_fraction: float = 1.0) -> dict[str, str]:
    """``{path: reason}`` of the convs :func:`detector_config` leaves out (see the module docstring)."""
    yaml = getattr(model, "yaml", None)
    image_ch = int(yaml.get("channels", 3)) if isinstance(yaml, dict) else 3
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if ".dfl" in f".{name}":
            out[name] = "fixed DFL conv"
        elif m.groups > 1:
            out[name] = f"grouped conv (groups={m.groups})"
        elif m.in_channels == image_ch and name.startswith("model.0."):
            out[name] = "stem (reads the image)"
        elif lora_fraction(m, r) > max_fraction:
            out[name] = f"thin layer (LoRA would be {lora_fraction(m, r):.0%} of its {m.weight.numel()} weights)"
    return out


def detector_config(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    exclude: Iterable[str] = (),
    train_modules: Iterable[str] = (),
    max_fraction: float = 1.0,
    batchnorm: str = "frozen",
) -> LoraConfig:
    """The default :class:`LoraConfig` for an Ultralytics detector.

    Targets every ``nn.Conv2d`` except those :func:`default_exclusions` names
    (grouped/depthwise, the stem, thin layers, DFL) and the
    ``train_modules`` (trained fully, so not adapted). Both YOLO26 heads are included.

    Args:
        model: the built detector (a ``DetectionModel``).
        r, alpha, dropout: as in :class:`LoraConfig`.
        exclude: extra path patterns never adapted.
        train_modules: modules trained fully (e.g. re-initialised class convs).
        max_fraction: leave out convs whose LoRA would exceed this fraction of their weights (default 1.0).
        batchnorm: as in :class:`LoraConfig` (``"frozen"``: BN statistics never move).
    """
    train_modules = tuple(train_modules)
    auto = [p for p in default_exclusions(model, r, max_fraction) if p not in train_modules]
    return LoraConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_types=("Conv2d",),
        exclude=(*exclude, *auto, *train_modules),
        train_modules=train_modules,
        batchnorm=batchnorm,
    )
