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
* the fixed ``dfl`` conv (older heads; YOLO26 has ``reg_max=1`` and none);
* with ``frozen_stride`` (off by default), **the early layers** (:func:`early_layers`):
  the leading layers whose output is at most ``frozen_stride`` times smaller than the
  image, in yolo26n at ``frozen_stride=4`` ``model.0``-``model.2`` (two stride-2 convs
  and the C3k2 at stride 4). They are left exactly as in the base, BatchNorm included,
  so the backward pass ends before them, as Ultralytics' ``freeze=3`` does. At the
  highest resolutions the backward costs the most per weight: a yolo26n LoRA training
  step (imgsz 160, CPU, BatchNorm adapting) took 0.86x full fine-tuning's instead of
  0.98x. But those layers' BatchNorm and LoRA carry most of a change of colours and
  textures: on the synthetic A -> B benchmark (bench/yolo_quality.py, three seeds)
  mAP50-95 fell from 0.42 to 0.33, so it is a choice, not the default.

Both YOLO26 heads (``cv2``/``cv3`` one-to-many, used by training and NMS
export, and ``one2one_cv2``/``one2one_cv3``, used by ``nms=False`` export) are
adapted the same way. When the class count changes, the re-initialised class
convs (:func:`class_convs`) are trained fully instead (frozen random class
convs give ~0 mAP).

The other tasks' models are adapted by the same rules. Their heads have more
outputs whose shape follows the dataset or the task, listed by
:func:`head_modules` (``TASK_HEADS``): segment adds the mask-coefficient convs
and the semantic-segmentation output of ``proto`` (one channel per class), OBB
the angle convs, pose every layer of the keypoint branch (its width follows
``kpt_shape``), classify the final ``nn.Linear``. The classifier is the one
model with ``nn.Linear`` layers worth adapting (``Classify.linear`` with a
large class count), so linears are targets too, under the same thin-layer rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..config import LoraConfig, as_patterns

# The default frozen_stride: 0, every layer adapted (see the module docstring for what 4 costs and saves).
FROZEN_STRIDE = 0
# The probe image's side for early_layers: a multiple of every YOLO model's largest stride (32).
_PROBE = 64


def early_layers(model: nn.Module, frozen_stride: int) -> list[str]:
    """Paths (``model.0``, ``model.1``, ...) of the leading layers whose output stride is at
    most ``frozen_stride``: a chain from the image, each layer reading the one before.

    The stride of each layer's output is read from one no-grad forward of a 64 x 64 zero image
    in eval mode (BatchNorm statistics untouched): ``64 / output width``. ``frozen_stride`` 0 gives ``[]``.
    """
    layers = getattr(model, "model", None)
    if frozen_stride < 1 or not isinstance(layers, (nn.Sequential, nn.ModuleList)) or not len(layers):
        return []
    yaml = getattr(model, "yaml", None)
    channels = int(yaml.get("channels", 3)) if isinstance(yaml, dict) else 3
    widths: dict[int, int] = {}

    def record(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                widths[i] = out.shape[-1]

        return hook

    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    param = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, _PROBE, _PROBE, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    names = {id(m): n for n, m in model.named_modules()}
    out: list[str] = []
    for i, layer in enumerate(layers):
        chained = i == 0 or getattr(layer, "f", -1) == -1  # reads the layer before it
        if not chained or i not in widths or _PROBE // widths[i] > frozen_stride:
            break
        out.append(names[id(layer)])
    return out


def under(name: str, prefixes: Iterable[str]) -> bool:
    """Whether module path ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


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


def lora_fraction(layer: nn.Conv2d | nn.Linear, r: int) -> float:
    """Rank-``r`` LoRA parameters of ``layer`` over its weight count: ``r (cin/g k^2 + cout/g) / (cout cin/g k^2)``.

    A linear layer is a 1x1 conv with ``g = 1``: ``r (in + out) / (out in)``.
    """
    if isinstance(layer, nn.Linear):
        return r * (layer.in_features + layer.out_features) / layer.weight.numel()
    k = layer.weight[0, 0].numel()
    g = layer.groups
    lora = r * (layer.in_channels // g * k + layer.out_channels // g)
    return lora / layer.weight.numel()


def default_exclusions(
    model: nn.Module, r: int, max_fraction: float = 1.0, frozen_stride: int = FROZEN_STRIDE
) -> dict[str, str]:
    """``{path: reason}`` of the convs and linears :func:`detector_config` leaves out (see the module docstring)."""
    yaml = getattr(model, "yaml", None)
    image_ch = int(yaml.get("channels", 3)) if isinstance(yaml, dict) else 3
    early = early_layers(model, frozen_stride)
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if lora_fraction(m, r) > max_fraction:
                out[name] = f"thin layer (LoRA would be {lora_fraction(m, r):.0%} of its {m.weight.numel()} weights)"
            continue
        if not isinstance(m, nn.Conv2d):
            continue
        if ".dfl" in f".{name}":
            out[name] = "fixed DFL conv"
        elif m.groups > 1:
            out[name] = f"grouped conv (groups={m.groups})"
        elif m.in_channels == image_ch and name.startswith("model.0."):
            out[name] = "stem (reads the image)"
        elif under(name, early):
            out[name] = f"early layer (output stride <= {frozen_stride}: frozen, the backward stops before it)"
        elif lora_fraction(m, r) > max_fraction:
            out[name] = f"thin layer (LoRA would be {lora_fraction(m, r):.0%} of its {m.weight.numel()} weights)"
    return out


def detector_config(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    exclude: str | Iterable[str] = (),
    train_modules: str | Iterable[str] = (),
    max_fraction: float = 1.0,
    batchnorm: str = "frozen",
    frozen_stride: int = FROZEN_STRIDE,
) -> LoraConfig:
    """The default :class:`LoraConfig` for an Ultralytics model of any task.

    Targets every ``nn.Conv2d`` and ``nn.Linear`` except those :func:`default_exclusions`
    names (grouped/depthwise, the stem, thin layers, DFL; early layers when asked) and the
    ``train_modules`` (trained fully, so not adapted). Both YOLO26 heads are included.

    Args:
        model: the built model (``DetectionModel`` or a task model: segment, pose, OBB, classify).
        r, alpha, dropout: as in :class:`LoraConfig`.
        exclude: extra path patterns never adapted (a string is one pattern).
        train_modules: modules trained fully (e.g. re-initialised class convs; a string is one).
        max_fraction: leave out convs whose LoRA would exceed this fraction of their weights (default 1.0).
        batchnorm: as in :class:`LoraConfig` (``"frozen"``: BN statistics never move).
        frozen_stride: the leading layers with output stride at most this are not adapted
            (:func:`early_layers`; 0, the default: every layer is).

    Raises:
        ConfigError: ``exclude`` or ``train_modules`` is not a pattern or a list of them;
            LoraConfig's own checks.
    """
    train_modules = as_patterns("train_modules", train_modules)
    auto = [p for p in default_exclusions(model, r, max_fraction, frozen_stride) if p not in train_modules]
    return LoraConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_types=("Conv2d", "Linear"),
        exclude=(*as_patterns("exclude", exclude), *auto, *train_modules),
        train_modules=train_modules,
        batchnorm=batchnorm,
    )


def _paths(model: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def _branches(head: nn.Module, attrs: Iterable[str]) -> list[nn.Module]:
    """The per-level branches ``head.<attr>[i]`` of the ``ModuleList`` attributes that exist."""
    out: list[nn.Module] = []
    for attr in attrs:
        branches = getattr(head, attr, None)
        if isinstance(branches, nn.ModuleList):
            out.extend(branches)
    return out


def _tails(head: nn.Module, attrs: Iterable[str]) -> list[nn.Module]:
    """The final ``nn.Conv2d`` of each branch (``Sequential(..., Conv2d)`` or a bare ``Conv2d``)."""
    tails: list[nn.Module] = []
    for branch in _branches(head, attrs):
        last = branch[-1] if isinstance(branch, nn.Sequential) else branch
        if isinstance(last, nn.Conv2d):
            tails.append(last)
    return tails


def _weighted_leaves(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Every conv, linear and BatchNorm inside ``modules``: the layers that hold a ``weight`` of their own."""
    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    return [m for top in modules for m in top.modules() if isinstance(m, kinds)]


def segment_heads(model: nn.Module) -> list[str]:
    """Class convs, mask-coefficient convs (``cv4[i][-1]``, both heads) and ``proto.semseg[-1]``.

    ``proto.semseg`` (YOLO26) is a training-only semantic-segmentation branch
    with one output channel per class, so it is re-initialised with the class convs.
    """
    head = head_of(model)
    if head is None:
        return []
    extra = _tails(head, ("cv4", "one2one_cv4"))
    semseg = getattr(getattr(head, "proto", None), "semseg", None)
    if isinstance(semseg, nn.Sequential) and isinstance(semseg[-1], nn.Conv2d):
        extra.append(semseg[-1])
    return class_convs(model) + _paths(model, extra)


def obb_heads(model: nn.Module) -> list[str]:
    """Class convs and angle convs (``cv4[i][-1]``, both heads)."""
    head = head_of(model)
    if head is None:
        return []
    return class_convs(model) + _paths(model, _tails(head, ("cv4", "one2one_cv4")))


def pose_heads(model: nn.Module) -> list[str]:
    """Class convs and every conv/BatchNorm of the keypoint branch, both heads.

    The whole branch, not just its output: its width is ``max(ch / 4, k (d + 2))``
    (YOLO26; ``max(ch / 4, k d)`` before) for ``kpt_shape = (k, d)``, so a new
    keypoint shape can re-initialise every layer of ``cv4`` as well as the
    ``cv4_kpts``/``cv4_sigma`` outputs. Those still supplied by the weights
    (same shape) are adapted, not trained, by the trainer.
    """
    head = head_of(model)
    if head is None:
        return []
    attrs = ("cv4", "one2one_cv4", "cv4_kpts", "one2one_cv4_kpts", "cv4_sigma", "one2one_cv4_sigma")
    return class_convs(model) + _paths(model, _weighted_leaves(_branches(head, attrs)))


def classify_heads(model: nn.Module) -> list[str]:
    """The classifier's final ``nn.Linear`` (``Classify.linear``; or the last linear of a torchvision head)."""
    head = head_of(model)
    if head is None:
        return []
    linear = getattr(head, "linear", None)
    if isinstance(linear, nn.Linear):
        return _paths(model, [linear])
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return _paths(model, linears[-1:])


TASK_HEADS: dict[str, Callable[[nn.Module], list[str]]] = {
    "detect": class_convs,
    "segment": segment_heads,
    "pose": pose_heads,
    "obb": obb_heads,
    "classify": classify_heads,
}


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Output-head layers of a ``task`` model whose shape follows the dataset (classes, keypoints) or the task.

    The trainer trains those that the loaded weights do not supply fully, and adapts the rest.

    Raises:
        NotImplementedError: ``task`` is not one of ``TASK_HEADS`` (detect, segment, pose, obb, classify).
    """
    if task not in TASK_HEADS:
        raise NotImplementedError(f"LoRA head modules: task {task!r} is not supported; supported: {sorted(TASK_HEADS)}")
    return TASK_HEADS[task](model)
