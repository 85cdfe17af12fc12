"""One plain, merged copy of a LoRA run's EMA model, made once and refreshed in place.

Ultralytics validates ``trainer.ema.ema`` after each epoch and pickles it into
``last.pt``/``best.pt``. For a LoRA run both want the merged model: a plain
``nn.Conv2d`` validates at full fine-tuning's speed (the LoRA EMA pays the extra A
and B convolutions on every image) and pickles without lorakit. Rebuilding it each
epoch (``merge_and_unload(deepcopy(ema))``) cost about 0.5 s on yolo26n, most of it
the deep copy (bench/yolo_train_profile.py); this copy is built once and refreshed
by copying tensors:

    merged[k] = ema[k]                                    every state entry but the adapted weights
    merged[p.weight] = W_p + sum_i s_i * delta W_i(p)     each adapted layer p, active adapters i
                                                          (a DoRA adapter by its own rule)

computed in fp32 and cast to the weight's dtype (``LoraLayer.lora_merged_weight``, the
arithmetic of :func:`lorakit.merge`), so the refreshed copy equals ``merge_and_unload(deepcopy(ema))``
bitwise. Fully trained modules (BatchNorm, new class convs) are the EMA's active
copies at the same paths, so their entries are copied like any other.
"""

from __future__ import annotations

import weakref
from copy import deepcopy

import torch
from torch import nn

from ..adapters import merge_and_unload
from ..layers import LoraLayer
from ..state import lora_layers

# Plain attributes of the EMA model (yaml, nc, args, names, stride: ModelEMA.update_attr copies them from the live
# model each epoch) are followed, so a checkpoint written from the copy says the same; these are not: the copy's
# train/eval mode is its own, and the loss object is built per model on first use.
_SKIP_ATTRS = ("training", "criterion")

# an adapted weight of the copy: (its tensor, the source's LoRA layer, the adapters merged, the source's weight)
_Merge = tuple[torch.Tensor, LoraLayer, tuple[str, ...], torch.Tensor]
# what a refresh copies: the copy's plain entries, the source's entries for them, and the merges
_Plan = tuple[list[torch.Tensor], list[torch.Tensor], list[_Merge]]


class MergedCopy:
    """A plain model equal to the LoRA model ``source`` merged, kept current by :meth:`refresh`.

    Attributes:
        model: the merged copy (original layer classes only; no lorakit state).
    """

    def __init__(self, source: nn.Module) -> None:
        self.model = merge_and_unload(deepcopy(source))
        # like Ultralytics' EMA: nothing trains it (merge_and_unload gives back the requires_grad the
        # model had before inject, which the live model's snapshot says is True)
        self.model.requires_grad_(False)
        self._source = weakref.ref(source)  # not an id(): a freed model's id can be reused
        self._version = -1  # nothing copied yet: the first refresh copies even for this source
        self._planned: tuple[weakref.ref[nn.Module], _Plan] | None = None  # see _plan

    def fits(self, source: nn.Module) -> bool:
        """True when ``source`` is the model last refreshed from, or has every state entry of the copy
        with the same shape (a new EMA of the same model, as NaN recovery and resume make)."""
        if self._source() is source:
            return True
        have = source.state_dict()
        return all(k in have and have[k].shape == v.shape for k, v in self.model.state_dict().items())

    def refresh(self, source: nn.Module, version: int) -> nn.Module:
        """Copy ``source``'s state into the copy, adapted weights merged; return the copy.

        ``version`` identifies ``source``'s state (the EMA's update count): a second
        call with the same source object and version is free. What goes where is found
        once per source object (:meth:`_plan`): its structure and live adapters are taken
        as fixed, as they are for a training run's EMA.

        Raises:
            KeyError: ``source`` lacks a state entry of the copy (its structure changed;
                build a new :class:`MergedCopy`).
        """
        if self._source() is source and version == self._version:
            return self.model
        plain_dst, plain_src, merges = self._plan(source)
        with torch.no_grad():
            torch._foreach_copy_(plain_dst, plain_src)  # one call for ~600 tensors
            for target, layer, names, weight in merges:
                # merged adapters are in the weight already; any variant's rule (DoRA is not additive)
                target.copy_(layer.lora_merged_weight(names, weight).to(target.dtype))
        for key, value in vars(source).items():
            if not key.startswith("_") and key not in _SKIP_ATTRS and key in vars(self.model):
                setattr(self.model, key, value)
        self._source, self._version = weakref.ref(source), version
        return self.model

    def _plan(self, source: nn.Module) -> _Plan:
        """The copy's entries taken as they are (targets, sources) and those merged, for ``source``:
        views of both models' tensors, found once per source object (reading two state dicts and
        walking the LoRA layers was half of a refresh's 15 ms on yolo26n)."""
        planned = self._planned
        if planned is not None and planned[0]() is source:
            return planned[1]
        have = source.state_dict()
        adapted = {}
        for path, layer in lora_layers(source):
            names = layer.lora_live_names()
            if names:
                adapted[".".join(filter(None, (path, layer.lora_handler.weight_name)))] = (layer, names)
        plain_dst: list[torch.Tensor] = []
        plain_src: list[torch.Tensor] = []
        merges: list[_Merge] = []
        for key, target in self.model.state_dict().items():
            if key in adapted:
                merges.append((target, *adapted[key], have[key]))
            else:
                plain_dst.append(target)
                plain_src.append(have[key])
        plan = (plain_dst, plain_src, merges)
        self._planned = (weakref.ref(source), plan)
        return plan
