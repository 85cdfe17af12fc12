"""LoRA trainers for every Ultralytics YOLO task, on Ultralytics' own task trainers.

Each class is :class:`~lorakit.yolo.trainer.LoraTrainerMixin` in front of the
task's trainer, so Ultralytics keeps building the task's model, data, loss and
validator, and the mixin adds LoRA (inject after the weights are loaded, freeze,
merged checkpoints, the adapter next to them). Only the head differs per task:

==========  ==============================  ===========================================
task        trainer                         head layers trained fully when new (shape)
==========  ==============================  ===========================================
detect      ``LoraDetectionTrainer``        class convs
segment     ``LoraSegmentationTrainer``     + mask-coefficient convs, ``proto.semseg``
pose        ``LoraPoseTrainer``             + the keypoint branch (follows ``kpt_shape``)
obb         ``LoraOBBTrainer``              + angle convs
classify    ``LoraClassificationTrainer``   ``Classify.linear`` only
==========  ==============================  ===========================================

``ClassificationTrainer`` derives from ``BaseTrainer``, not ``DetectionTrainer``;
the mixin's overrides only call ``super()`` with ``BaseTrainer``'s signatures, so
they fit it unchanged. Its ``get_model`` sets ``requires_grad=True`` everywhere,
which the mixin undoes (inject after it, re-freeze in ``build_optimizer``), and
its ``setup_model`` calls ``reshape_outputs``, a no-op here because the model was
already built with the dataset's class count.
"""

from __future__ import annotations

from torch import nn
from ultralytics.models.yolo.classify import ClassificationTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer

from .targets import classify_heads, obb_heads, pose_heads, segment_heads
from .trainer import LoraDetectionTrainer, LoraTrainerMixin


class LoraSegmentationTrainer(LoraTrainerMixin, SegmentationTrainer):  # type: ignore[misc]
    """``SegmentationTrainer`` with LoRA; see :class:`~lorakit.yolo.trainer.LoraDetectionTrainer`."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """Class convs, mask-coefficient convs and the semantic-segmentation output (one channel per class)."""
        return segment_heads(model)


class LoraPoseTrainer(LoraTrainerMixin, PoseTrainer):  # type: ignore[misc]
    """``PoseTrainer`` with LoRA; see :class:`~lorakit.yolo.trainer.LoraDetectionTrainer`."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """Class convs and the keypoint branch, whose width follows ``kpt_shape``."""
        return pose_heads(model)


class LoraOBBTrainer(LoraTrainerMixin, OBBTrainer):  # type: ignore[misc]
    """``OBBTrainer`` with LoRA; see :class:`~lorakit.yolo.trainer.LoraDetectionTrainer`."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """Class convs and angle convs."""
        return obb_heads(model)


class LoraClassificationTrainer(LoraTrainerMixin, ClassificationTrainer):  # type: ignore[misc]
    """``ClassificationTrainer`` with LoRA; see :class:`~lorakit.yolo.trainer.LoraDetectionTrainer`."""

    def head_modules(self, model: nn.Module) -> list[str]:
        """The final ``nn.Linear`` (one output per class)."""
        return classify_heads(model)


TRAINERS: dict[str, type[LoraTrainerMixin]] = {
    "detect": LoraDetectionTrainer,
    "segment": LoraSegmentationTrainer,
    "pose": LoraPoseTrainer,
    "obb": LoraOBBTrainer,
    "classify": LoraClassificationTrainer,
}


def trainer_for(task: str) -> type[LoraTrainerMixin]:
    """The LoRA trainer class of an Ultralytics ``task`` (``YOLO(...).task``).

    Raises:
        NotImplementedError: a task without a LoRA trainer (e.g. ``"semantic"``, ``"depth"``).
    """
    try:
        return TRAINERS[task]
    except KeyError:
        raise NotImplementedError(
            f"LoRA training is not supported for Ultralytics task {task!r}; supported tasks: {sorted(TRAINERS)}"
        ) from None
