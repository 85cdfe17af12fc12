"""``LoraYOLO``: ``ultralytics.YOLO`` that fine-tunes with a LoRA adapter.

::

    from lorakit.yolo import LoraYOLO
    model = LoraYOLO("yolo26n.pt", r=8)                 # or a .yaml; LoRA options as keywords
    model.train(data="data.yaml", epochs=20, imgsz=640) # every YOLO.train argument works (and r=, ...)
    model.save_adapter("my_adapter")                    # the adapter alone (best epoch)
    model.val(); model.predict("img.jpg")               # the merged model, as plain YOLO
    model.export(format="onnx")                         # merged, zero LoRA overhead

After ``train`` the object holds the merged ``best.pt`` exactly as ``YOLO``
would; that file loads in plain Ultralytics without lorakit. ``train``,
``val`` and ``predict`` save under ``./runs/<task>/`` unless ``project=`` or
the user's Ultralytics ``runs_dir`` setting says otherwise
(:func:`~lorakit.yolo.offline.runs_project`).

Serving several adapters on one base::

    model = LoraYOLO("base.pt", adapter="runs/detect/train/weights/best_adapter")
    model.load_adapter("other_adapter", name="other")   # same base, its own head and BatchNorm
    model.adapters                                     # ['train-best', 'other']: named after the run
    model.set_adapter("other"); model.predict("img.jpg")
    with model.adapter_disabled():                     # the base model's exact predictions
        model.predict("img.jpg")
    model.save_merged("other_merged.pt")              # plain Ultralytics checkpoint

``predict``, ``val``, ``track``, ``benchmark`` and ``export`` run on a merged copy
of the active adapter (Ultralytics fuses Conv+BN on those paths, which needs
plain convs); the copy is cached until the adapter changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any, cast

from torch import nn
from ultralytics import YOLO  # type: ignore[attr-defined]

from .. import adapters as core
from .. import owned
from ..adapters import merge_and_unload
from ..config import LoraConfig, as_patterns
from ..errors import AdapterNotFoundError, ConfigError
from ..io import LoadReport, copy_adapter, load_adapter, read_adapter_files
from ..io_format import atomic_path
from ..io_peft import from_peft_config
from ..layers import LoraLayer
from .checks import check_settings
from .offline import runs_project
from .provenance import recorded_merge
from .targets import FROZEN_STRIDE
from .tasks import trainer_for
from .trainer import LoraOptions, LoraTrainerMixin
from .variants import Variant, fresh_variant

# The LoRA settings LoraYOLO(...) and LoraYOLO.train(...) take.
LORA_OPTIONS = tuple(f.name for f in dataclasses.fields(LoraOptions))


class LoraYOLO(YOLO):  # type: ignore[misc]
    """``ultralytics.YOLO`` whose ``train`` trains a LoRA adapter (see :class:`LoraOptions`).

    Args:
        model: a ``.pt`` checkpoint or ``.yaml`` config, as for ``YOLO``.
        adapter: an adapter folder to load on it (as :meth:`load_adapter`, named after its run).
        r, alpha, dropout, exclude, config, adapt_bn, adapter_name, max_fraction, measure_forms, loraplus_ratio,
        frozen_stride: the LoRA settings, see :class:`~lorakit.yolo.trainer.LoraOptions`. ``exclude``
            is a path pattern or a list of them (a string is one pattern).
        task, verbose: as for ``YOLO``.

    Raises:
        ConfigError: invalid LoRA settings (``exclude`` not a pattern or a list of them, ...).
        NotImplementedError: a model that is not a plain YOLO detector (World, YOLOE, RT-DETR).
    """

    def __init__(
        self,
        model: str | Path = "yolo26n.pt",
        *,
        adapter: str | Path | None = None,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        exclude: str | Iterable[str] = (),
        config: LoraConfig | None = None,
        adapt_bn: bool = True,
        adapter_name: str = "default",
        max_fraction: float = 1.0,
        measure_forms: bool = False,
        loraplus_ratio: float | None = None,
        frozen_stride: int = FROZEN_STRIDE,
        task: str | None = None,
        verbose: bool = False,
    ) -> None:
        lora = LoraOptions(
            r=r,
            alpha=alpha,
            dropout=dropout,
            exclude=as_patterns("exclude", exclude),
            config=config,
            adapt_bn=adapt_bn,
            adapter_name=adapter_name,
            max_fraction=max_fraction,
            measure_forms=measure_forms,
            loraplus_ratio=loraplus_ratio,
            frozen_stride=frozen_stride,
        )
        super().__init__(model, task=task, verbose=verbose)
        if not isinstance(self, LoraYOLO):  # YOLO.__init__ switched the class (World/YOLOE/RT-DETR)
            raise NotImplementedError(f"LoraYOLO supports YOLO detectors only, got {type(self).__name__}")
        self.lora = lora
        self._base: Variant | None = None  # the base's own versions of the modules adapters replace
        self._variants: dict[str, Variant] = {}
        self._disabled = False
        self._view: tuple[Any, nn.Module] | None = None  # (state key, merged copy) for inference
        self._generation = 0
        if adapter is not None:
            self.load_adapter(adapter)

    # ------------------------------------------------------------------ adapters on a loaded base

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters loaded with :meth:`load_adapter`, in load order."""
        return list(self._variants)

    @property
    def active_adapter(self) -> str | None:
        """The adapter predictions use, or ``None`` (the base model)."""
        active = core.active_adapters(self._lora_model()) if self._variants else ()
        return active[0] if active else None

    def _lora_model(self) -> nn.Module:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"LoraYOLO: adapters need a PyTorch model, not {type(self.model).__name__}")
        return self.model

    def _install(self, name: str | None) -> None:
        """Put the base's modules back, then adapter ``name``'s (``None``: the base alone)."""
        model = self._lora_model()
        assert self._base is not None
        self._base.install(model)
        if name is not None:
            self._variants[name].install(model)
        self._changed()

    def _changed(self) -> None:
        self._generation += 1
        self._view = None
        self.predictor = None  # it holds a fused copy of the previous state

    def load_adapter(
        self, path: str | Path, name: str | None = None, *, activate: bool = True, allow_other_base: bool = False
    ) -> LoadReport:
        """Load an adapter folder (written by a LoRA run, or PEFT-format) onto this base model.

        The adapter's fully trained modules (a new class count's class convs, its
        BatchNorm layers) go into copies of the base's, so the base and every other
        loaded adapter keep theirs; the class names come from the file.

        Args:
            path: the adapter folder, e.g. ``runs/detect/train/weights/best_adapter``.
            name: its name here (default: :func:`adapter_name`: ``train-best`` for that
                folder, so two runs' ``best_adapter`` folders get two names).
            activate: make it the active adapter (default).
            allow_other_base: as :func:`lorakit.io.load_adapter`.

        Raises:
            ConfigError: the name is taken, or the model was trained here (merged weights
                are not a base); the errors of :func:`lorakit.io.load_adapter` (file, keys,
                shapes, other base). The model is unchanged on any error.
        """
        path = Path(path)
        name = name or adapter_name(path)
        model = self._lora_model()
        if name in self._variants:
            raise ConfigError(f"LoraYOLO.load_adapter({str(path)!r}): an adapter named {name!r} is loaded already")
        files = read_adapter_files(path)
        cfg, _ = from_peft_config(files.config_file, files.raw_config, strict=False)
        paths = owned.train_paths(model, cfg.train_modules)
        previous = self.active_adapter
        base = self._base or Variant.capture(model)
        for p in paths:  # the base's own modules, whichever adapter's copies are installed now
            base.modules[p] = cast(nn.Module, owned.base_object(model, p))
        variant = fresh_variant(model, base, paths, files)  # may raise: nothing is installed yet
        # the core puts the adapter's tensors into these copies, or leaves the model as it was
        report = load_adapter(model, path, name, allow_other_base=allow_other_base, modules=variant.modules)
        self._base = base
        self._variants[name] = variant
        if activate:
            self._install(name)
        else:
            self._install(previous)
            core.set_adapter(model, [previous] if previous else [])
        return report

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``None``: none, the base model)."""
        if name is not None and name not in self._variants:
            raise AdapterNotFoundError(f"LoraYOLO.set_adapter: no adapter {name!r}; loaded: {self.adapters}")
        if not self._variants:
            if name is None:
                return
            raise AdapterNotFoundError("LoraYOLO.set_adapter: no adapter loaded (load_adapter first)")
        self._install(name)
        core.set_adapter(self._lora_model(), [name] if name else [])

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the base becomes active if it was)."""
        if name not in self._variants:
            raise AdapterNotFoundError(f"LoraYOLO.delete_adapter: no adapter {name!r}; loaded: {self.adapters}")
        active = self.active_adapter
        self._install(None if active == name else active)
        core.delete_adapter(self._lora_model(), name)
        del self._variants[name]
        self._changed()

    @contextmanager
    def adapter_disabled(self) -> Iterator[LoraYOLO]:
        """Inside the block the model is exactly the base: LoRA off and the base's own modules and names."""
        if not self._variants:
            yield self
            return
        active = self.active_adapter
        self._install(None)
        self._disabled = True
        try:
            with core.disabled(self._lora_model()):
                yield self
        finally:
            self._disabled = False
            self._install(active)

    def merged_model(self) -> nn.Module:
        """A plain Ultralytics model (no LoRA layer) of the current state: the active adapter
        merged in, or the base itself when none is active or inside :meth:`adapter_disabled`.
        Cached until the state changes; do not modify it."""
        model = self._lora_model()
        if not any(isinstance(m, LoraLayer) for m in model.modules()):
            return model
        key = (self._generation, self._disabled, self.active_adapter)
        if self._view is None or self._view[0] != key:
            # The copy shares every adapter's factors instead of copying them: merging only
            # reads them, and unwrapping drops the copy's references. Copying all of them made
            # each switch cost time in proportion to the number of adapters loaded.
            shared: dict[int, Any] = {
                id(ad): ad for m in model.modules() if isinstance(m, LoraLayer) for ad in m.lora.values()
            }
            copy = deepcopy(model, shared)
            if self._disabled or key[2] is None:
                core.unload(copy)
            else:
                merge_and_unload(copy)
            self._view = (key, copy)
        return self._view[1]

    @contextmanager
    def _merged(self) -> Iterator[None]:
        """``self.model`` is the merged copy inside the block (Ultralytics' inference paths fuse it)."""
        model = self.model
        view = self.merged_model() if isinstance(model, nn.Module) else model
        if view is model:
            yield
            return
        self.model = view
        try:
            yield
        finally:
            self.model = model

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``YOLO.predict`` with the active adapter merged (the base inside :meth:`adapter_disabled`).

        Raises:
            ConfigError: a bad ``device`` (:func:`~lorakit.yolo.checks.check_settings`), before any work.
        """
        check_settings(kwargs, "predict")
        with self._merged():
            return super().predict(*args, **runs_project(kwargs.get("task") or str(self.task), kwargs))

    def val(self, *args: Any, **kwargs: Any) -> Any:
        """``YOLO.val`` with the active adapter merged.

        Raises:
            ConfigError: a bad ``device`` (:func:`~lorakit.yolo.checks.check_settings`), before any work.
        """
        check_settings(kwargs, "val")
        with self._merged():
            return super().val(*args, **runs_project(kwargs.get("task") or str(self.task), kwargs))

    def track(self, *args: Any, **kwargs: Any) -> Any:
        """``YOLO.track`` with the active adapter merged."""
        with self._merged():
            return super().track(*args, **kwargs)

    def benchmark(self, *args: Any, **kwargs: Any) -> Any:
        """``YOLO.benchmark`` with the active adapter merged."""
        with self._merged():
            return super().benchmark(*args, **kwargs)

    def save_merged(self, path: str | Path) -> Path:
        """Write the current state (active adapter merged) as a plain Ultralytics ``.pt``.

        The file loads with ``ultralytics.YOLO(path)`` without lorakit installed. Its
        ``train_args`` are the adapter run's (``data``, ``imgsz``), not the base's, and its
        ``description`` names the adapter and the base (:mod:`.provenance`). It is
        written atomically (temp file, fsync, rename): a reader or a crash sees the old
        file or the new one, never half a checkpoint.

        Raises:
            OSError: the file cannot be written (the message names it).
        """
        path = Path(path)
        active = None if self._disabled else self.active_adapter  # its run's data and a description go in
        source = self._variants[active].source if active else None
        with self._merged(), recorded_merge(self, source), atomic_path(path) as tmp:
            self.save(tmp)
        return path

    def train(self, trainer: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Train a LoRA adapter; arguments as ``YOLO.train``, plus the LoRA settings. Returns the metrics.

        The LoRA settings of the constructor (``r``, ``alpha``, ``dropout``, ``exclude``, ``config``,
        ``adapt_bn``, ``adapter_name``, ``max_fraction``, ``measure_forms``, ``loraplus_ratio``,
        ``frozen_stride``: :class:`~lorakit.yolo.trainer.LoraOptions`) may be given here too, and then
        override the constructor's for this run; ``dropout`` is LoRA's (Ultralytics uses it for classifier
        heads only). At the end it prints where the
        merged checkpoints and the adapter folders are (:func:`saved_files`). Without ``project=``
        the run goes under ``./runs/<task>/`` unless the user's Ultralytics settings chose a
        ``runs_dir`` (:func:`~lorakit.yolo.offline.runs_project`).

        The trainer is the task's (:func:`~lorakit.yolo.tasks.trainer_for`: detect,
        segment, pose, obb, classify). ``optimizer="auto"`` (the default) means AdamW with lr 0.007 (LoRA wants
        about 7x the learning rate of full fine-tuning); MuSGD is refused.
        ``resume=True`` on ``LoraYOLO("runs/.../weights/last.pt")`` continues an
        interrupted LoRA run with its adapter, EMA and optimizer state (the LoRA
        settings are the run's own). ``trainer`` may name another class built on
        :class:`~lorakit.yolo.trainer.LoraTrainerMixin`. Several GPUs (``device="0,1"``) run
        Ultralytics' DDP: each worker process gets these LoRA settings, and rank 0 alone writes the
        adapters, the merged checkpoints and the resume state (``batch`` is the total over the GPUs).

        Raises:
            ConfigError: adapters are loaded; a bad ``optimizer`` (MuSGD included) or ``device``
                (:func:`~lorakit.yolo.checks.check_settings`); bad LoRA settings, or LoRA settings
                with ``resume=True``; all before any work.
        """
        lora_kwargs = {k: kwargs.pop(k) for k in LORA_OPTIONS if k in kwargs}
        if lora_kwargs and kwargs.get("resume"):
            raise ConfigError(
                f"LoraYOLO.train: resume=True continues the run with its own LoRA settings; drop {sorted(lora_kwargs)}"
            )
        lora = dataclasses.replace(self.lora, **lora_kwargs) if lora_kwargs else self.lora
        check_settings(kwargs, "train")
        if self._variants:
            raise ConfigError(
                "LoraYOLO.train: adapters are loaded on this model; training starts a new adapter from the "
                "base, so use a LoraYOLO(base) without loaded adapters"
            )
        cls = trainer or trainer_for(str(self.task))
        if not (isinstance(cls, type) and issubclass(cls, LoraTrainerMixin)):
            raise TypeError(f"LoraYOLO.train: trainer must subclass LoraTrainerMixin, got {cls!r}")
        metrics = super().train(trainer=partial(cls, lora=lora), **runs_project(str(self.task), kwargs))
        for line in saved_files(self.trainer):
            print(line)
        return metrics

    @property
    def adapter_dir(self) -> Path | None:
        """The adapter folder of the last run (best epoch if one was saved), or ``None`` before training."""
        t = self.trainer
        if not isinstance(t, LoraTrainerMixin):
            return None
        for p in (t.best_adapter, t.last_adapter):
            if p.exists():
                return Path(p)
        return None

    def save_adapter(self, path: str | Path) -> Path:
        """Copy the trained adapter folder (best epoch) to ``path``; return ``path``.

        Written as one save (:func:`lorakit.io.copy_adapter`): a crash or a concurrent save
        leaves the adapter that was at ``path`` or this one, never a mix of the two.

        Raises:
            RuntimeError: nothing has been trained yet.
            OSError: a file cannot be written (the message names it).
        """
        src = self.adapter_dir
        if src is None:
            raise RuntimeError("LoraYOLO.save_adapter: no adapter yet; call train() first")
        return copy_adapter(src, path)

    def export(self, **kwargs: Any) -> Any:
        """``YOLO.export`` on the merged model (the active adapter merged into a copy): zero LoRA overhead.

        Raises:
            ConfigError: an unknown ``format``, a package the format needs is not installed, or a
                bad ``device`` (:func:`~lorakit.yolo.checks.check_settings`), before any work.
        """
        check_settings(kwargs, "export")
        active = None if self._disabled else self.active_adapter  # read before the merged copy replaces the model
        folder = None if active is None else Path(self._variants[active].source["adapter"])
        with self._merged(), _named_after(self.model, folder):
            return super().export(**kwargs)


@contextmanager
def _named_after(model: Any, adapter: Path | None) -> Iterator[None]:
    """Name ``model``'s export after the adapter folder (``weights/best_adapter.onnx`` next to it).

    Ultralytics names it after the model's ``pt_path``: the base's, so every adapter's
    export would land on ``base.onnx`` next to the base and overwrite the last one.
    ``model`` is the merged copy (:meth:`LoraYOLO._merged`), so the base keeps its ``pt_path``.
    """
    if adapter is None or not isinstance(model, nn.Module):
        yield
        return
    view: Any = model  # Ultralytics' models carry pt_path untyped
    old = getattr(view, "pt_path", None)
    view.pt_path = str(adapter.parent / f"{adapter.name}.pt")
    try:
        yield
    finally:
        view.pt_path = old


def adapter_name(path: str | Path) -> str:
    """The default name of an adapter loaded from folder ``path``: its run's, for a run's folder.

    ``runs/detect/train2/weights/best_adapter`` -> ``train2-best`` (``last_adapter`` ->
    ``train2-last``), so adapters of two runs, or the best and last of one, get distinct names;
    any other folder keeps its own name.
    """
    path = Path(path).absolute()  # "best_adapter" given from inside weights/ names its run too
    run = path.parent.parent.name
    if path.name in ("best_adapter", "last_adapter") and path.parent.name == "weights" and run:
        return f"{run}-{path.name.removesuffix('_adapter')}"
    return path.name


def saved_files(trainer: Any) -> list[str]:
    """What a finished LoRA run wrote, as the lines ``LoraYOLO.train`` (and ``lorakit yolo train``) print:
    the merged checkpoints (plain Ultralytics ``.pt``) and the adapter folders, best and last."""
    if not isinstance(trainer, LoraTrainerMixin):
        return []
    t: Any = trainer  # Ultralytics' attributes (best, last) are untyped
    merged = [f"{p} ({k})" for k, p in (("best", t.best), ("last", t.last)) if Path(p).is_file()]
    adapters = [f"{p} ({k})" for k, p in (("best", t.best_adapter), ("last", t.last_adapter)) if Path(p).is_dir()]
    return [
        f"merged checkpoints (plain Ultralytics .pt): {', '.join(merged) or 'none written'}",
        f"adapter folders: {', '.join(adapters) or 'none written'}",
    ]
