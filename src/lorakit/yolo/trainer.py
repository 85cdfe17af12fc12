"""A LoRA-aware Ultralytics ``DetectionTrainer``.

Ultralytics' trainer rebuilds the model from its YAML (copying the pretrained
weights by key and shape), sets ``requires_grad=True`` again on frozen layers in
its freeze loop, keeps an EMA deep copy made after the optimizer, and pickles
whole modules into ``last.pt``/``best.pt``. Each override below undoes one of
those steps for LoRA:

===========================  ===========================================================
override                     why
===========================  ===========================================================
``get_model``                the trainer builds a fresh model from YAML and copies the
                             pretrained weights by key; LoRA is injected *after* that,
                             so the base weights are the pretrained ones
``_setup_train``             its freeze loop sets ``requires_grad=True`` on every frozen
                             float parameter (one warning each); those warnings are muted;
                             its EMA averages only what trains (:func:`average_what_changes`)
``build_optimizer``          restores the LoRA ``requires_grad`` set, freezes BatchNorm
                             statistics (``"model."`` in ``freeze_layer_names``), and
                             builds the groups from trainable parameters only, with an
                             explicit optimizer ("auto" -> AdamW lr 0.007; MuSGD refused:
                             Muon would orthogonalise the LoRA factors); on a CPU its
                             fused (Adam/AdamW) or foreach kernels (:func:`cpu_kernels`)
``validate``                 validates the EMA model *merged* (plain ``nn.Conv2d``, as
                             fast as full fine-tuning's), one copy refreshed in place
                             (:mod:`.merged`)
``save_model``               writes the resume state, then ``last.pt``/``best.pt`` from
                             that merged copy (loads, fuses and exports without lorakit),
                             and the adapter next to them
``final_eval``               Ultralytics' final validation of ``best.pt``; then each
                             file gets a ``description`` naming adapter and base
                             (:mod:`.provenance`) and the resume state goes
``check_resume``,            ``resume=True``: ``last.pt`` holds merged weights, so the
``get_model``,               base, the LoRA tensors and their EMA come from
``_load_checkpoint_state``   ``weights/lora_resume/`` (:mod:`.resume`); the optimizer
                             state from ``last.pt`` as usual
``_handle_nan_recovery``     on a NaN/Inf loss Ultralytics reloads ``last.pt`` into the
                             live model, which fails here (merged weights, no LoRA
                             keys); what training changes (BatchNorm statistics
                             included), its EMA and the optimizer state of the last
                             good epoch are restored from memory (:mod:`.good_epoch`)
``train``, ``setup_model``   several GPUs (``device=0,1``): the LoRA state travels to
                             Ultralytics' DDP workers (see below)
===========================  ===========================================================

Several GPUs: Ultralytics' ``train`` then pickles ``type(trainer)``, ``vars(trainer.args)``,
the model and the callbacks (``ultralytics.utils.dist.generate_ddp_file``, with cloudpickle)
and runs ``torch.distributed.run`` on a script that rebuilds the trainer in each worker as
``cls(cfg=..., overrides=args, _callbacks=...)``: the ``lora=`` keyword (a ``partial``) is
lost, and the model, when the launcher built it, arrives injected without its LoraConfig.
So while the launcher writes that file its ``args`` hold :class:`CarriedLora` under
``DDP_ARGS_KEY`` (removed again before anything saves ``args``); each worker's ``__init__``
takes it out of ``overrides``. Every worker thus injects with the same options, or adopts
the launcher's injected model with the launcher's config (``setup_model``). Rank 0 alone
writes files: Ultralytics calls ``save_model`` there only, and ``get_model``,
``setup_model`` and ``final_eval`` check ``RANK``; NaN recovery is decided by rank 0 for
all, as in Ultralytics.

Ultralytics' ``final_eval`` re-validates ``best.pt`` from disk with ``fuse=True``,
which works because that file is already merged.

Per epoch a LoRA run writes what full fine-tuning writes (``last.pt``, ``best.pt``
when it improved) plus the adapter (``last_adapter``; ``best_adapter`` gets the same
bytes, encoded once) and the resume state (:mod:`.resume`), all small. What these read
is found once per run: the changing state entries of each model (:meth:`LoraTrainerMixin.changing_state`)
and the frozen base's fingerprints, which the adapter files record. The description
is written once, at the end, with Ultralytics' own final rewrite of the checkpoints
(reading and re-writing a checkpoint cost about 0.3 s per file per epoch): a run killed
before its end leaves ``last.pt``/``best.pt`` without it, loading as usual.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

from ..batchnorm import freeze_batchnorm
from ..config import LoraConfig, as_patterns, finite_number
from ..conv_forms import measure_conv_forms
from ..errors import ConfigError
from ..inject import InjectReport, inject
from ..io import base_fingerprints
from ..layers import LoraLayer
from ..loraplus import loraplus_split
from . import layout, resume
from .checks import check_optimizer
from .good_epoch import GoodEpoch
from .merged import MergedCopy
from .provenance import RUN_KEYS, describe_checkpoint, merge_description
from .speed import SpeedMixin
from .targets import FROZEN_STRIDE, class_convs, detector_config, early_layers, under

# What optimizer="auto" means for LoRA: 7x what full fine-tuning wanted on the synthetic A->B benchmark
# (bench/yolo_quality.md; yolo26n, r=8, BatchNorm adapting, 15 epochs). There lr 0.007 reached 96-100 % of
# full fine-tuning's mAP50-95 (seed-matched), 0.01 91-93 %, 0.02 collapsed, and the old 0.002 gave 62 %;
# full fine-tuning itself peaked at lr 0.001.
LORA_AUTO_OPTIMIZER = ("AdamW", 0.007)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA settings of a YOLO run (the keyword arguments of :class:`~lorakit.yolo.LoraYOLO`).

    Args:
        r, alpha, dropout: as in :class:`~lorakit.LoraConfig` (defaults 8, r, 0).
        exclude: extra path patterns never adapted (added to the detector defaults); a string
            is one pattern.
        config: a full :class:`~lorakit.LoraConfig`, used as given instead of the
            detector defaults (re-initialised class convs are still added to its
            ``train_modules``); ``r``/``alpha``/``dropout``/``exclude`` must then be left at their defaults.
        adapt_bn: train BatchNorm weights and let their running statistics update
            (default True). The BatchNorm layers are then saved with the adapter
            (``train_modules``), so base + adapter reproduce the trained model. With
            False (BN frozen) the adapter is LoRA factors and class convs only, but
            on the synthetic A -> B benchmark (bench/yolo_quality.md) frozen-BN LoRA
            at lr 0.005-0.01 let activations grow without bound (class logits ~1e5,
            an fp16 overflow); with BN updating they stayed at full fine-tuning's size.
        adapter_name: the adapter's name in the model and in saved files.
        max_fraction: see :func:`lorakit.yolo.targets.detector_config`.
        frozen_stride: the leading layers whose output stride is at most this (4: in yolo26n
            ``model.0``-``model.2``) stay exactly as in the base, BatchNorm included, so the
            backward pass ends before them (:func:`lorakit.yolo.targets.early_layers`): a cheaper
            step (0.86x full fine-tuning's instead of 0.98x, yolo26n at imgsz 160 on a CPU) for
            lower accuracy where the domains differ in colour or texture (bench/yolo_quality.md).
            0 (default): every layer adapted. Used with the detector defaults, not with ``config=``.
        measure_forms: before the first epoch, time both LoRA forms of every adapted conv at
            the run's batch and image size and use the faster per layer
            (:func:`lorakit.conv_forms.measure_conv_forms`; about one training step). Off by
            default: the built-in rule (``ConvHandler.thin_cost``) was calibrated the same way on
            a CPU and came within 1 % of the per-layer faster forms; other hardware (a GPU) may
            differ.
        loraplus_ratio: LoRA+ (:func:`lorakit.loraplus_split`): each optimizer group's B
            factors learn at ``ratio`` times its lr (16 is the paper's choice); None: off.
            Kept on ``resume=True`` (it decides the optimizer's groups).
    """

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    exclude: tuple[str, ...] = ()
    config: LoraConfig | None = None
    adapt_bn: bool = True
    adapter_name: str = "default"
    max_fraction: float = 1.0
    measure_forms: bool = False
    loraplus_ratio: float | None = None
    frozen_stride: int = FROZEN_STRIDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", as_patterns("exclude", self.exclude))
        stride = self.frozen_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ConfigError(f"LoraOptions: frozen_stride must be an int >= 0, got {stride!r}")
        ratio = self.loraplus_ratio
        if ratio is not None and (not finite_number(ratio) or ratio <= 0):
            raise ConfigError(f"LoraOptions: loraplus_ratio must be None or a finite number > 0, got {ratio!r}")
        if self.config is not None:
            fields = {f.name: f.default for f in dataclasses.fields(self)}
            clash = [n for n in ("r", "alpha", "dropout", "exclude") if getattr(self, n) != fields[n]]
            if clash:
                raise ConfigError(f"LoraOptions: give either config= or {clash}, not both")
        else:  # fail now, not inside the trainer after Ultralytics has made the run folder
            LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, exclude=self.exclude, targets="all-linear")

    def build(self, model: nn.Module, train_modules: list[str]) -> LoraConfig:
        """The LoraConfig for ``model``, with ``train_modules`` trained fully and not adapted.

        With ``adapt_bn`` every BatchNorm layer is added to ``train_modules``, so the
        adapter file carries their weights *and* running statistics: the base model
        plus the adapter then reproduce the trained model.
        """
        early = early_layers(model, self.frozen_stride) if self.config is None else []
        if self.adapt_bn:
            bn = [
                n
                for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not under(n, early)
            ]
            train_modules = [*train_modules, *(n for n in bn if n not in train_modules)]
        if self.config is None:
            return detector_config(
                model,
                r=self.r,
                alpha=self.alpha,
                dropout=self.dropout,
                exclude=self.exclude,
                train_modules=train_modules,
                max_fraction=self.max_fraction,
                batchnorm="update" if self.adapt_bn else "frozen",
                frozen_stride=self.frozen_stride,
            )
        extra = tuple(p for p in train_modules if p not in self.config.train_modules)
        return dataclasses.replace(
            self.config,
            exclude=(*self.config.exclude, *extra),
            train_modules=(*self.config.train_modules, *extra),
            batchnorm="update" if self.adapt_bn else self.config.batchnorm,
        )


# The trainer.args key that carries CarriedLora into Ultralytics' DDP workers (only while the launcher
# writes their file: see the module docstring).
DDP_ARGS_KEY = "lorakit_ddp"


@dataclass(frozen=True)
class CarriedLora:
    """What a DDP worker's trainer needs from the launching one (pickled with Ultralytics' worker state).

    ``config``, ``report`` and ``trainable`` are the launcher's injection, given when it
    built the model (``LoraYOLO.train`` from a ``.pt``: Ultralytics pickles that injected
    model for the workers); ``None``/empty when the workers build it (a ``.yaml`` model, or
    ``resume=True``, whose LoRA settings come from the run's resume state).
    """

    options: LoraOptions
    config: LoraConfig | None = None
    report: InjectReport | None = None
    trainable: frozenset[str] = frozenset()


YOLO_METADATA = "lorakit_yolo"  # safetensors header key: what a base needs besides the tensors (class names)


def yolo_metadata(model: nn.Module, task: str | None = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts a base model needs to take this adapter besides its tensors.

    ``task``, the class ``names`` (the head's class convs are in the file, their names
    are not), for pose models ``kpt_shape``, and from ``run`` (the training arguments)
    ``data`` and ``imgsz``: a checkpoint merged from this adapter carries them as its
    ``train_args``, not the base's (:mod:`.provenance`).
    """
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) else None
    names = getattr(model, "names", None) or {}
    meta: dict[str, Any] = {
        "task": task or getattr(model, "task", None),
        "names": {str(k): v for k, v in names.items()},
    }
    if head is not None and getattr(head, "kpt_shape", None) is not None:
        meta["kpt_shape"] = [int(k) for k in cast(Any, head).kpt_shape]
    for key in RUN_KEYS:
        value = (run or {}).get(key)
        if value is not None:
            meta[key] = str(value) if key == "data" else value
    return meta


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    task: str | None = None,
    run: dict[str, Any] | None = None,
    also: tuple[Path, ...] = (),
    base_fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` (plus its ``train_modules``) to the folder ``path``
    (and the same files to each folder in ``also``).

    :func:`lorakit.io.save_adapter` with the detector's class names and task (and the
    run's ``data`` and ``imgsz`` from ``run``) in the safetensors header (key
    ``lorakit_yolo``), so that :meth:`LoraYOLO.load_adapter <lorakit.yolo.LoraYOLO.load_adapter>`
    can give a base model the adapter's classes. ``base_fingerprints``: as in that function.
    """
    from ..io import save_adapter as save

    meta = yolo_metadata(model, task, run)
    text = json.dumps(meta, sort_keys=True)
    return save(model, path, name, metadata={YOLO_METADATA: text}, also=also, base_fingerprints=base_fingerprints)


class _DropRequiresGradWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "setting 'requires_grad=True' for frozen layer" not in record.getMessage()


@contextmanager
def _muted_unfreeze_warnings() -> Iterator[None]:
    flt = _DropRequiresGradWarnings()
    LOGGER.addFilter(flt)
    try:
        yield
    finally:
        LOGGER.removeFilter(flt)


def new_head_modules(model: nn.Module, weights: Any, heads: list[str]) -> list[str]:
    """Those of ``heads`` that did not come from ``weights`` (none given, or any tensor of another shape).

    Every state entry under a head path is compared, so a path may name a leaf conv or
    a whole block (an Ultralytics ``Conv`` has no ``.weight`` of its own).
    """
    if not weights:
        return heads
    src = (weights.get("ema") or weights.get("model")) if isinstance(weights, dict) else weights
    src_sd = src.state_dict() if isinstance(src, nn.Module) else {}
    sd = model.state_dict()

    def loaded(path: str) -> bool:
        keys = [k for k in sd if k.startswith(f"{path}.")]
        return bool(keys) and all(k in src_sd and src_sd[k].shape == sd[k].shape for k in keys)

    return [p for p in heads if not loaded(p)]


class LoraTrainerMixin(SpeedMixin):
    """The LoRA overrides (see the module docstring), for any Ultralytics task trainer, on
    :class:`~lorakit.yolo.speed.SpeedMixin` (channels-last on an x86 CPU, the setup's heap frozen).

    Put it first: ``class LoraSegmentationTrainer(LoraTrainerMixin, SegmentationTrainer)``.
    A task whose output head has other re-initialised convs than the detector's
    class convs overrides :meth:`head_modules`.

    Raises (``__init__``):
        ConfigError: ``overrides[DDP_ARGS_KEY]`` is not a :class:`CarriedLora`.
    """

    # Ultralytics' BaseTrainer attributes this mixin reads (set there, untyped)
    args: Any
    model: Any
    ema: Any
    optimizer: Any
    scheduler: Any
    wdir: Path
    last: Path
    best: Path
    world_size: int
    freeze_layer_names: list[str]
    best_fitness: Any
    fitness: Any
    loss: Any
    start_epoch: int
    epoch: int
    nan_recovery_attempts: int
    ddp: bool

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict[str, Any] | None = None,
        *,
        lora: LoraOptions | None = None,
    ) -> None:
        overrides = dict(overrides or {})
        carried = overrides.pop(DDP_ARGS_KEY, None)  # set in a DDP worker only (see CarriedLora)
        if carried is not None and not isinstance(carried, CarriedLora):
            raise ConfigError(f"overrides[{DDP_ARGS_KEY!r}]: expected a CarriedLora, got {type(carried).__name__}")
        self._carried: CarriedLora | None = carried
        self.lora = lora or (carried.options if carried else LoraOptions())
        self.lora_report: InjectReport | None = None
        self.lora_config: LoraConfig | None = None
        self._lora_trainable: set[str] = set()
        self._last_good = GoodEpoch()  # NaN recovery point, see _handle_nan_recovery
        self._resume: resume.ResumeState | None = None  # set by check_resume when resuming
        self._merged: MergedCopy | None = None  # the EMA merged, for validation and checkpoints
        self._changing_keys: list[str] | None = None  # what the resume state holds (resume.changing_keys)
        # each model's resume.changing_state, found once per model object (the live model, each EMA)
        self._changing: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()
        self._fingerprints: dict[str, dict[str, Any]] | None = None  # the frozen base's, for every adapter save
        super().__init__(cfg, overrides, _callbacks)  # type: ignore[call-arg]
        self.last_adapter = self.wdir / "last_adapter"
        self.best_adapter = self.wdir / "best_adapter"

    def train(self) -> None:
        """Ultralytics' ``train``; when it launches DDP workers, they get this trainer's LoRA state."""
        if not self.ddp:
            super().train()  # type: ignore[misc]
            return
        with self.carrying_lora():
            super().train()  # type: ignore[misc]

    @contextmanager
    def carrying_lora(self) -> Iterator[CarriedLora]:
        """Inside the block ``self.args`` holds this trainer's :class:`CarriedLora` under
        ``DDP_ARGS_KEY``, so a DDP worker file written now (Ultralytics'
        ``generate_ddp_file``) carries it; ``args`` is as before afterwards (checkpoints save
        ``args`` and must not pickle lorakit objects)."""
        injected = isinstance(self.model, nn.Module) and self.lora_config is not None
        carried = CarriedLora(
            options=self.lora,
            config=self.lora_config if injected else None,
            report=self.lora_report if injected else None,
            trainable=frozenset(self._lora_trainable) if injected else frozenset(),
        )
        setattr(self.args, DDP_ARGS_KEY, carried)
        try:
            yield carried
        finally:
            delattr(self.args, DDP_ARGS_KEY)

    def setup_model(self) -> Any:
        """Ultralytics' ``setup_model``; a model that arrives injected (a DDP worker's, pickled by the
        launcher after its ``get_model``) is adopted with the launcher's LoraConfig.

        Raises:
            RuntimeError: the model has LoRA layers but no :class:`CarriedLora` with a config came with it.
        """
        model = self.model
        if (
            isinstance(model, nn.Module)
            and self.lora_config is None
            and any(isinstance(m, LoraLayer) for m in model.modules())
        ):
            carried = self._carried
            if carried is None or carried.config is None:
                raise RuntimeError(
                    f"{type(self).__name__}: the model given has LoRA layers but no LoraConfig came with it; "
                    "let the trainer build the model (get_model)"
                )
            self.lora_config, self.lora_report = carried.config, carried.report
            self._lora_trainable = set(carried.trainable)
            if RANK in {-1, 0}:  # the launcher wrote it into the run folder it then cleared for the workers
                resume.write_base(self.wdir, model)
        return super().setup_model()  # type: ignore[misc]

    def check_resume(self, overrides: dict[str, Any]) -> None:
        """Ultralytics' resume checks, then the LoRA state saved beside ``last.pt`` (see :mod:`.resume`).

        The run's own LoRA settings are used; options given now are ignored, as
        Ultralytics ignores most training arguments on resume.
        """
        super().check_resume(overrides)  # type: ignore[misc]
        if not getattr(self, "resume", False):
            return
        from ultralytics.nn.tasks import load_checkpoint

        last = Path(self.args.resume)
        ckpt = cast(Any, load_checkpoint)(last)[1]
        state = resume.read(last, int(ckpt.get("epoch", -1)))
        self._resume = state
        self.lora = LoraOptions(
            config=state.config,
            adapt_bn=state.adapt_bn,
            adapter_name=state.adapter_name,
            loraplus_ratio=state.loraplus_ratio,
        )
        LOGGER.info(f"LoRA: resuming adapter {state.adapter_name!r} from epoch {state.epoch + 1} ({last})")

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        """Build and load the model as Ultralytics does, then inject LoRA (pretrained weights are the base).

        On resume the model is rebuilt from the saved base state (``weights`` is the
        merged ``last.pt`` and cannot give it back) and the saved LoRA tensors.
        """
        state = self._resume
        model: nn.Module = super().get_model(  # type: ignore[misc]
            cfg=cfg, weights=None if state else weights, verbose=verbose and not state
        )
        if any(isinstance(m, LoraLayer) for m in model.modules()):  # pragma: no cover - super() builds fresh
            raise RuntimeError("get_model: the freshly built model already has LoRA layers")
        if state is None:
            new_convs = new_head_modules(model, weights, self.head_modules(model))
            config = self.lora.build(model, new_convs)
        else:
            resume.copy_into(model, state.base, f"{resume.FOLDER}/{resume.BASE_FILE}")
            config, new_convs = state.config, []
        report = inject(model, config, self.lora.adapter_name)
        if self.lora.adapt_bn:
            # inject trains the BatchNorm layers of config.train_modules; the others (the early layers'
            # with LoraOptions.frozen_stride) keep the base's statistics: eval mode for good
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    freeze_batchnorm(m)
        if state is None:
            if RANK in {-1, 0}:  # DDP: every worker builds the same model; one writes it
                resume.write_base(self.wdir, model)
        else:
            resume.copy_into(model, state.live, f"{resume.FOLDER}/epoch{state.epoch}.safetensors")
        self.lora_config, self.lora_report = config, report
        self._lora_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if self.channels_last():
            # the base is channels-last already (SpeedMixin); now the LoRA factors, before the EMA and the
            # merged copy are made from the model
            layout.to_channels_last(model)
        if verbose:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            LOGGER.info(
                f"LoRA: {len(report.targets)} layers adapted (r={config.r}), {len(new_convs)} new head modules trained "
                f"fully{', BatchNorm trained' if self.lora.adapt_bn else ''}; trainable {trainable:,} of "
                f"{report.total:,} parameters"
            )
        return model

    def _load_checkpoint_state(self, ckpt: dict[str, Any]) -> None:
        """Ultralytics' resume of optimizer, scaler and stopper; the EMA comes from the LoRA state
        (``last.pt``'s EMA is merged and does not fit the LoRA model)."""
        super()._load_checkpoint_state({**ckpt, "ema": None})  # type: ignore[misc]
        state = self._resume
        if state is not None and self.ema is not None:
            self.ema = cast(Any, ModelEMA)(self.model)  # as Ultralytics does: validation leaves inference tensors
            resume.copy_into(self.ema.ema, state.ema, f"{resume.FOLDER}/epoch{state.epoch}.safetensors (EMA)")
            self.ema.updates = ckpt["updates"]

    def final_eval(self) -> None:
        """Ultralytics' final validation of ``best.pt``; the checkpoints get their ``description``, and the
        resume state goes (the run is finished).

        Ultralytics' ``final_eval`` rewrites both checkpoints once more (``strip_optimizer``, which
        takes ``updates`` for the file); the description rides along with that rewrite instead of a
        second load and save of each file (0.3 s per run on yolo26n). A checkpoint that rewrite did
        not describe (another Ultralytics) gets it the slow way, :func:`.provenance.describe_checkpoint`.
        """
        described: set[Path] = set()
        with self._describing(described):
            super().final_eval()  # type: ignore[misc]
        if RANK not in {-1, 0}:  # DDP: rank 0 wrote the files and alone rewrites them
            return
        for pt, adapter in ((self.last, self.last_adapter), (self.best, self.best_adapter)):
            if pt.is_file() and adapter.is_dir() and pt not in described:
                describe_checkpoint(pt, merge_description(adapter, self.args.model, self.args.data))
        resume.remove(self.wdir)

    @contextmanager
    def _describing(self, described: set[Path]) -> Iterator[None]:
        """Inside the block Ultralytics' trainer module strips ``last.pt``/``best.pt`` with the
        checkpoint's ``description`` among the ``updates``; each file so written is added to ``described``."""
        import inspect

        import ultralytics.engine.trainer as engine

        original = getattr(engine, "strip_optimizer", None)
        if original is None or "updates" not in inspect.signature(original).parameters:
            yield
            return
        adapters = {self.last: self.last_adapter, self.best: self.best_adapter}

        def strip(f: Any = "best.pt", s: str = "", updates: dict[str, Any] | None = None) -> Any:
            adapter = adapters.get(Path(f))
            if adapter is not None and not s and adapter.is_dir():
                text = merge_description(adapter, self.args.model, self.args.data)
                updates = {**(updates or {}), "description": text}
                described.add(Path(f))
            return original(f, s, updates)

        setattr(engine, "strip_optimizer", strip)  # noqa: B010 - the name final_eval looks up at call time
        try:
            yield
        finally:
            setattr(engine, "strip_optimizer", original)  # noqa: B010

    def head_modules(self, model: nn.Module) -> list[str]:
        """Output-head modules that are trained fully when ``weights`` do not supply them
        (a new class count re-initialises them): the detector's class convs, both heads."""
        return class_convs(model)

    def _setup_train(self) -> None:
        with _muted_unfreeze_warnings():
            super()._setup_train()  # type: ignore[misc]
        average_what_changes(self.ema, unwrap_model(self.model))  # the EMA made there (on resume: ours)
        if self.lora.measure_forms:
            self._measure_forms()

    def _measure_forms(self) -> None:
        """Time both forms of each LoRA conv at this run's batch and image size; keep the faster."""
        t: Any = self  # Ultralytics' trainer attributes are untyped
        size, batch = int(t.args.imgsz), int(t.batch_size)
        channels = int((t.data or {}).get("channels", 3))
        x = torch.zeros(batch, channels, size, size, device=t.device)
        t0 = time.perf_counter()
        model = unwrap_model(t.model)  # not through DDP: a forward without backward would confuse its reducer
        with torch.autocast(t.device.type, enabled=bool(t.amp)):  # the precision training runs in
            measured = measure_conv_forms(model, lambda: model(x))
        weight = sum(1 for m in measured.values() if m["chosen"])
        LOGGER.info(
            f"LoRA: conv forms measured at batch {batch}, imgsz {size} in {time.perf_counter() - t0:.1f} s: "
            f"{weight} weight form, {len(measured) - weight} activation form"
        )

    def build_optimizer(
        self,
        model: nn.Module,
        name: str = "auto",
        lr: float = 0.001,
        momentum: float = 0.9,
        decay: float = 1e-5,
        iterations: float = 1e5,
    ) -> torch.optim.Optimizer:
        """Re-freeze to the LoRA set, freeze BN statistics, and optimise trainable parameters only."""
        user_frozen = list(self.freeze_layer_names)
        for n, p in unwrap_model(model).named_parameters():
            p.requires_grad_(n in self._lora_trainable and not any(f in n for f in user_frozen))
        if not self.lora.adapt_bn:
            # LoraConfig(batchnorm="frozen") already keeps BN in eval mode; this is Ultralytics' own switch
            # (_model_train() puts BatchNorms matching these names in eval mode), kept as a second guard.
            self.freeze_layer_names.append("model.")
        name = check_optimizer(name)  # MuSGD refused; LoraYOLO.train checked it already, other callers may not
        if name == "auto":
            name, lr = LORA_AUTO_OPTIMIZER
            self.args.optimizer, self.args.lr0 = name, lr
            LOGGER.info(f"LoRA: optimizer=auto means {name}(lr={lr}) here")
        optimizer: torch.optim.Optimizer = super().build_optimizer(  # type: ignore[misc]
            model, name, lr, momentum, decay, iterations
        )
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        if self.lora.loraplus_ratio is not None:
            loraplus_split(optimizer, unwrap_model(model), self.lora.loraplus_ratio)
            LOGGER.info(f"LoRA+: B factors learn at {self.lora.loraplus_ratio:g}x their group's lr")
        kept = [p for g in optimizer.param_groups for p in g["params"]]
        if kept and all(p.device.type == "cpu" for p in kept):
            cpu_kernels(optimizer)
        numbers = sum(p.numel() for p in kept)
        LOGGER.info(f"LoRA: the optimizer keeps {len(kept)} trainable tensors ({numbers:,} numbers)")
        return optimizer

    def merged_ema(self) -> nn.Module:
        """The EMA model with LoRA merged: one plain copy, refreshed when the EMA has changed."""
        assert self.ema is not None
        ema = self.ema.ema
        if self._merged is None or not self._merged.fits(ema):  # first use, or a new EMA of another structure
            self._merged = MergedCopy(ema)
        return self._merged.refresh(ema, int(self.ema.updates))

    @contextmanager
    def _ema_merged(self) -> Iterator[None]:
        """Inside the block ``self.ema.ema`` is :meth:`merged_ema` (what Ultralytics validates and pickles)."""
        assert self.ema is not None
        lora_ema = self.ema.ema
        self.ema.ema = self.merged_ema()
        try:
            yield
        finally:
            self.ema.ema = lora_ema

    def validate(self) -> tuple[Any, Any]:
        """Ultralytics' validation, of the EMA merged (the LoRA EMA would pay its extra convolutions per image)."""
        with self._ema_merged():
            return cast(tuple[Any, Any], super().validate())  # type: ignore[misc]

    def save_model(self) -> bool:
        """Write the resume state, then merged ``last.pt``/``best.pt`` (the EMA with LoRA folded in) and the adapter.

        The resume state goes first: a run killed between the two leaves ``last.pt`` of the
        previous epoch, whose state is kept (:func:`.resume.write_epoch` keeps two), rather
        than a ``last.pt`` naming an epoch with no state.
        """
        assert self.ema is not None and self.lora_config is not None
        lora_ema = self.ema.ema
        live = unwrap_model(self.model)
        resume.write_epoch(
            self.wdir,
            self.epoch,
            self.changing_state(live),
            self.changing_state(lora_ema),
            self.lora_config,
            self.lora.adapter_name,
            self.lora.adapt_bn,
            loraplus_ratio=self.lora.loraplus_ratio,
        )
        with self._ema_merged():  # SpeedMixin writes it in the usual layout
            saved = bool(super().save_model())
        if saved:
            if self._fingerprints is None:  # the base is frozen for the run: read it once
                self._fingerprints = base_fingerprints(live, self.lora.adapter_name)
            run = {"data": self.args.data, "imgsz": self.args.imgsz}
            best = (self.best_adapter,) if self.best_fitness == self.fitness else ()  # as Ultralytics' best.pt
            name, task = self.lora.adapter_name, self.args.task
            save_adapter(lora_ema, self.last_adapter, name, task, run, also=best, base_fingerprints=self._fingerprints)
        return saved

    def changing_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state entries that training changes (:func:`.resume.changing_state`), found once per
        model object (the live model, each EMA): views of its tensors, which training updates in place."""
        state = self._changing.get(model)
        if state is None:
            if self._changing_keys is None:  # the structure is fixed for the run: find the keys once
                assert self.lora_config is not None
                self._changing_keys = resume.changing_keys(unwrap_model(self.model), self.lora_config)
            state = self._changing[model] = resume.changing_state(model, self._changing_keys)
        return state

    def _handle_nan_recovery(self, epoch: int) -> bool:
        """On a NaN/Inf loss or fitness, go back to the last good epoch (from memory, not ``last.pt``).

        Same policy as Ultralytics: nothing to do on the first epoch, at most 3 attempts,
        then ``RuntimeError``; under DDP rank 0 decides for every rank. A good epoch is
        remembered here, on every rank (``save_model`` runs on rank 0 only). Returns True
        when the epoch must be redone.
        """
        loss_nan = self.loss is not None and not bool(torch.isfinite(self.loss).all())
        fitness_nan = self.fitness is not None and not math.isfinite(float(self.fitness))
        corrupted = RANK in {-1, 0} and (loss_nan or fitness_nan)
        if RANK != -1 and dist.is_available() and dist.is_initialized():  # as Ultralytics: every rank follows rank 0
            decision = [corrupted if RANK == 0 else None]
            dist.broadcast_object_list(decision, 0)
            corrupted = bool(decision[0])
        t: Any = self  # Ultralytics' trainer attributes are untyped (None in __init__)
        good = self._last_good
        if not corrupted:
            live, ema = self.changing_state(unwrap_model(t.model)), self.changing_state(t.ema.ema)
            good.take(live, ema, t.ema.updates, t.optimizer)
            return False
        reason = "Loss NaN/Inf" if loss_nan else "Fitness NaN/Inf"
        if epoch == self.start_epoch or not good.taken:
            LOGGER.warning(f"{reason} detected but no saved epoch to go back to yet; continuing")
            return False
        self.nan_recovery_attempts += 1
        if self.nan_recovery_attempts > 3:
            raise RuntimeError(
                f"Training failed: NaN persisted for {self.nan_recovery_attempts} epochs (LoRA: try a lower lr0)"
            )
        LOGGER.warning(
            f"{reason} detected (attempt {self.nan_recovery_attempts}/3), restoring the adapter of the last good epoch"
        )
        t._model_train()
        model = unwrap_model(t.model)
        t.ema = cast(Any, ModelEMA)(model)  # a fresh EMA, as Ultralytics does (validation leaves inference tensors)
        average_what_changes(t.ema, model)
        good.restore(self.changing_state(model), self.changing_state(t.ema.ema), t.optimizer)
        t.ema.updates = good.updates
        t.optimizer.zero_grad()
        t.scheduler.last_epoch = epoch - 1
        return True


def average_what_changes(ema: Any, model: nn.Module) -> bool:
    """Let Ultralytics' ``ModelEMA`` ``ema`` of ``model`` average only what training can change.

    Its update lerps every floating state entry toward the model's, the frozen base weights
    too (about 90 % of a LoRA model's numbers), whose averages never move: a lerp between equal
    values gives the same value exactly, so leaving them out changes no bit. In Ultralytics 8.4
    the update walks a list of (EMA, model) tensor pairs built on its first call, ``_pairs``;
    here it is built before that, without the parameters ``model`` does not train
    (``requires_grad`` False). Buffers (BatchNorm statistics) all stay in. An EMA without that
    attribute, or one that has updated already, is left as it is.

    Returns:
        True when the list was built here.
    """
    if ema is None or not hasattr(ema, "_pairs") or ema._pairs is not None:
        return False
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    have = model.state_dict()
    pairs = [(v, have[k]) for k, v in ema.ema.state_dict().items() if v.dtype.is_floating_point and k not in frozen]
    ema._pairs = [e for e, _ in pairs], [m for _, m in pairs]
    return True


def cpu_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Step every group of ``optimizer`` (its parameters on the CPU) with one kernel per step, not per tensor.

    torch picks its fused and foreach kernels for CUDA only; on a CPU each tensor is then
    stepped in a Python loop. A LoRA run has more, smaller tensors than full fine-tuning
    (yolo26n: 436 LoRA factors and BatchNorm vectors, 330k numbers), so the loop cost it
    43 ms a step against 7 ms fused (AdamW, one thread). Adam and AdamW take the fused
    kernel (as Ultralytics gives them on CUDA), the others their foreach form.
    """
    fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for group in optimizer.param_groups:
        if fused:
            group["fused"], group["foreach"] = True, False
        elif "foreach" in group:
            group["foreach"] = True


class LoraDetectionTrainer(LoraTrainerMixin, DetectionTrainer):  # type: ignore[misc]
    """Ultralytics ``DetectionTrainer`` that trains a LoRA adapter (see the module docstring).

    Use through :class:`~lorakit.yolo.LoraYOLO`, or directly::

        YOLO("base.pt").train(data=..., trainer=LoraDetectionTrainer)          # default LoraOptions
        YOLO("base.pt").train(data=..., trainer=functools.partial(LoraDetectionTrainer, lora=LoraOptions(r=16)))

    After training: ``weights/last.pt`` and ``best.pt`` are plain merged
    Ultralytics checkpoints; ``weights/last_adapter`` and ``best_adapter`` hold
    the adapter; ``self.lora_report`` says what was adapted; ``self.model`` (live)
    and ``self.ema.ema`` still carry the unmerged LoRA layers.
    """
