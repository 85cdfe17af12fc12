"""Find the layers a :class:`LoraConfig` selects, add an adapter to each, freeze the rest."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from . import init_svd, owned, state
from .adapters import active_adapters, set_adapter
from .batchnorm import _keep_eval as _keep_eval  # pickles made before the move name lorakit.inject._keep_eval
from .batchnorm import freeze_batchnorm, release_batchnorm
from .config import ALL_LINEAR, LoraConfig, PatternSet, is_wildcard
from .errors import ConfigError, TargetError
from .layers.base import LayerHandler, LoraAdapter, LoraLayer, handler_for, registered_types, wrap
from .peft_names import is_svd_init
from .state import lora_layers
from .variants import variant_of

__all__ = [
    "InjectReport",
    "Target",
    "freeze_batchnorm",
    "inject",
    "lora_layers",
    "release_batchnorm",
    "select_targets",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Target:
    """One adapted layer: its path, type, rank, scaling and LoRA parameter count."""

    name: str
    layer_type: str
    r: int
    scaling: float
    params: int
    layer_params: int


@dataclass(frozen=True)
class InjectReport:
    """What :func:`inject` did.

    ``trainable``/``total`` count parameters after injection (``total`` includes
    the adapters); ``reduction = total / trainable``.
    """

    adapter: str
    targets: tuple[Target, ...]
    trainable: int
    total: int

    @property
    def reduction(self) -> float:
        return self.total / self.trainable if self.trainable else float("inf")

    @property
    def lora_params(self) -> int:
        return sum(t.params for t in self.targets)

    def summary(self) -> str:
        """One line: counts, percentage and reduction factor."""
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"adapter {self.adapter!r}: {len(self.targets)} layers, trainable {self.trainable:,} of "
            f"{self.total:,} parameters ({pct:.3f}%, {self.reduction:,.1f}x fewer)"
        )

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.targets] + [5])
        lines = [f"{'layer':<{width}}  {'type':<10} {'r':>4} {'scale':>7} {'lora':>10} {'layer':>11}"]
        for t in self.targets:
            lines.append(
                f"{t.name:<{width}}  {t.layer_type:<10} {t.r:>4} {t.scaling:>7.3g} "
                f"{t.params:>10,} {t.layer_params:>11,}"
            )
        lines.append(self.summary())
        return "\n".join(lines)


def _type_matches(module: nn.Module, wanted: Sequence[str | type]) -> bool:
    names = {k.__name__ for k in type(module).__mro__}
    return any(w in names if isinstance(w, str) else isinstance(module, w) for w in wanted)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            return None
        return head if isinstance(head, nn.Module) else None
    return None


def select_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, LayerHandler]]:
    """The ``(path, layer, handler)`` triples ``config`` selects in ``model``, in module order.

    Raises:
        TargetError: a layer named exactly (not by a wildcard) or selected by
            ``target_types`` has no handler; or nothing matched (the message lists
            the closest module names and the adaptable layers).
    """
    head = _output_head(model) if ALL_LINEAR in config.targets else None
    targets = PatternSet(p for p in config.targets if p != ALL_LINEAR)
    excluded = PatternSet(config.exclude)
    skip: set[int] = set()
    found: list[tuple[str, nn.Module, LayerHandler]] = []
    for name, module in model.named_modules():
        if id(module) in skip:
            continue
        if isinstance(module, LoraLayer):
            skip.update(id(m) for m in module.lora.modules())
        if isinstance(module, LoraAdapter):
            continue
        by_name = targets.matching(name)
        by_type = bool(config.target_types) and _type_matches(module, config.target_types)
        handler = handler_for(module)
        by_all_linear = (
            ALL_LINEAR in config.targets and handler is not None and handler.kind == "linear" and module is not head
        )
        if not (by_name or by_type or by_all_linear):
            continue
        if excluded.matching(name):
            continue
        if handler is None:
            explicit = [p for p in by_name if not is_wildcard(p)]
            if explicit or by_type:
                why = f"targets entry {explicit[0]!r}" if explicit else "target_types"
                raise TargetError(
                    f"{name or '<root>'}: selected by {why}, but layer type {type(module).__name__} has no LoRA "
                    f"handler; adaptable types are {registered_types()} (lorakit.register adds one)"
                )
            continue
        found.append((name, module, handler))
    if not found:
        raise TargetError(_nothing_matched(model, config))
    return found


def _nothing_matched(model: nn.Module, config: LoraConfig) -> str:
    names = [n for n, _ in model.named_modules() if n]
    adaptable = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and handler_for(m) is not None]
    hints = []
    for p in config.targets:
        if p == ALL_LINEAR or is_wildcard(p):
            continue
        leaf = sorted({n.rsplit(".", 1)[-1] for n in names})
        close = difflib.get_close_matches(p, leaf, n=3, cutoff=0.5) + difflib.get_close_matches(p, names, n=3)
        if close:
            hints.append(f"{p!r}: did you mean {sorted(set(close))}?")
    shown = ", ".join(adaptable[:12]) + (f", ... ({len(adaptable)} in all)" if len(adaptable) > 12 else "")
    return (
        f"no layer matched targets={list(config.targets)} target_types="
        f"{[t if isinstance(t, str) else t.__name__ for t in config.target_types]} "
        f"(exclude={list(config.exclude)}). " + " ".join(hints) + f" Adaptable layers: {shown or 'none'}"
    )


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"adapter name must be letters, digits, '_' or '-' (and not a reserved word), got {name!r}")
    for path, layer in lora_layers(model):
        if name in layer.lora:
            raise ConfigError(f"adapter {name!r} already exists (e.g. on {path or '<root>'}); delete_adapter it first")


def inject(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    activate: bool = True,
    modules: Mapping[str, nn.Module] | None = None,
) -> InjectReport:
    """Add adapter ``name`` to every layer ``config`` selects; freeze everything else.

    For each selected layer with weight ``W`` (out x in for Linear), adds factors
    ``A`` (r x in) and ``B`` (out x r) with ``B = 0``, so outputs are unchanged
    until training moves ``B``: ``y = W x + b + s * B A dropout(x)``.
    The layer object is kept (same ``isinstance``, same ``state_dict`` keys for
    the base part); see :mod:`lorakit.layers`.

    The modules in ``config.train_modules`` and the biases ``config.bias`` selects
    are trained fully, each on the adapter's own copy (:mod:`lorakit.owned`): the
    base keeps its originals, so other adapters and ``disabled()`` never see them.

    Afterwards only the adapter's ``A``/``B`` and its copies (if ``activate``) have
    ``requires_grad=True``. With ``activate=False`` the new adapter is added
    inactive and frozen, and the active adapters stay as they were.

    Args:
        model: any ``nn.Module``; changed in place.
        config: what to adapt and how.
        name: adapter name (letters, digits, ``_``, ``-``), unique in the model.
        activate: make ``name`` the only active adapter (default True).
        modules: the adapter's copies of some ``train_modules`` paths, used instead of
            deep copies of the base's (e.g. a detector head resized for another class count).

    Returns:
        :class:`InjectReport` with the adapted layers and trainable/total counts.

    Raises:
        ConfigError: bad or duplicate adapter name.
        TargetError: nothing matched (with the closest names), an explicitly
            targeted layer has no handler, or a rank cannot work on a layer (e.g.
            ``r % groups != 0``); ``config.dora`` on a layer DoRA does not support
            (a grouped conv, a handler without DoRA hooks: :mod:`lorakit.variants`).
        ConfigError: a trained module holds LoRA layers or nests with another adapter's.
        Nothing is changed when anything is raised.
    """
    _check_name(model, name)
    found = select_targets(model, config)
    found_trained: set[str] = set()  # the train_modules patterns some module matches
    trained = PatternSet(config.train_modules)
    for n, _ in model.named_modules():
        found_trained.update(trained.matching(n))
    missing = [p for p in config.train_modules if p not in found_trained]
    if missing:
        raise TargetError(f"train_modules {missing} matched no module of the model")
    plans = []
    variant = variant_of(config.dora)
    for path, module, handler in found:  # check everything before changing anything
        r = config.rank_for(path)
        handler.check(module, r, path or "<root>")
        variant.check(handler, module, path or "<root>")
        if is_svd_init(config.init):  # it changes base weights: refuse before any changes
            init_svd.check(module, handler, r, config.init, path or "<root>")
        plans.append((path, module, handler, r))
    train = owned.train_paths(model, config.train_modules)
    biases = owned.bias_paths(model, config.bias, [p for p, _, _ in found], train)
    copies = owned.plan(model, name, train, biases, modules)

    previously_active = active_adapters(model)
    targets = []
    initials: dict[str, init_svd.Initial] = {}
    for path, module, handler, r in plans:
        weight = getattr(module, handler.weight_name)
        a_shape, b_shape = handler.factor_shapes(module, r)
        adapter = LoraAdapter(
            a_shape,
            b_shape,
            r=r,
            alpha=config.alpha_for(path),
            scaling=config.scaling_for(path),
            dropout=config.dropout,
            dtype=handler.factor_dtype(module),
            device=weight.device,
            variant=variant.name,
        )
        if is_svd_init(config.init):
            initials[path] = init_svd.init_from_weight(module, handler, adapter, config.init, path or "<root>")
        else:
            handler.init_factors(adapter.A, adapter.B, config.init, r)
        variant.init(handler, module, adapter)
        adapter.train(module.training)  # a new module starts in train mode; follow the layer
        layer_params = sum(p.numel() for p in module.parameters(recurse=False))
        layer = wrap(module)
        layer.lora[name] = adapter
        layer.lora_active = previously_active
        layer.lora_refresh()
        targets.append(
            Target(
                name=path or "<root>",
                layer_type=layer._lora_base_cls.__name__,
                r=r,
                scaling=config.scaling_for(path),
                params=sum(p.numel() for p in adapter.parameters()),
                layer_params=layer_params,
            )
        )
    if state.peek(model) is None:  # first adapter: remember what unload must restore
        state.of(model).requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    state.of(model).configs[name] = config
    init_svd.record(model, name, initials if is_svd_init(config.init) else None)
    owned.add(model, name, copies)

    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, name if activate or not previously_active else previously_active)
    if config.batchnorm == "frozen":
        freeze_batchnorm(model)
    if "transformers" in sys.modules:  # save_pretrained would drop the adapter: make it raise (lorakit.hf.saving)
        from .hf.saving import guard_save_pretrained

        guard_save_pretrained(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectReport(adapter=name, targets=tuple(targets), trainable=trainable, total=total)
