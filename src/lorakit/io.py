"""Save and load adapters as PEFT-compatible files: strict, atomic, no pickle.

A saved adapter is a folder with two files, exactly as PEFT's ``save_pretrained``
writes them (so ``peft.PeftModel.from_pretrained(base, folder)`` loads it, and
lorakit loads PEFT's)::

    adapter_config.json          PEFT LoraConfig: r, lora_alpha, target_modules (the exact
                                 adapted paths), rank/alpha_pattern, use_rslora, bias, ...
    adapter_model.safetensors    tensors, key names in :mod:`lorakit.io_peft`

lorakit's own fields live in the safetensors ``__metadata__``, which PEFT never
reads (an unknown key in the JSON would make PEFT warn and drop it):

    lorakit_version          the writer's version
    lorakit_checksums        JSON {tensor key: sha256 of its bytes}
    lorakit_base             JSON {layer path: fingerprint of its base weight}
    lorakit_config_sha256    sha256 of the adapter_config.json written with it

Loading checks all of these when present; PEFT-written files have none, so the
base-model check is skipped for them.

How the two files are replaced together (a lock per folder, the new config written beside
the old before the weights are renamed, readers that roll forward) is in
:mod:`lorakit.io_folder`: a killed or concurrent save leaves the old adapter or the new one.
Files are read only when they are regular files, with a bounded read (:mod:`lorakit.io_format`).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Container, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import init_svd, owned
from ._version import __version__
from .adapters import active_adapters, delete_adapter, list_adapters, set_adapter
from .config import LoraConfig
from .errors import AdapterNotFoundError, ConfigError, LoraError, NonFiniteError, check_materialised
from .inject import _CONFIGS_ATTR, inject, lora_layers, select_targets
from .io_errors import (
    AdapterConfigError,
    AdapterFileError,
    BaseModelMismatchError,
    DtypeMismatchError,
    KeyMismatchError,
    NonFiniteTensorError,
    ShapeMismatchError,
    UnsafeFormatError,
)
from .io_folder import CONFIG_FILE as CONFIG_FILE  # re-exported: the file names belong to the folder protocol
from .io_folder import WEIGHTS_FILE as WEIGHTS_FILE
from .io_folder import config_sha, read_pair, write_adapter
from .io_format import (
    FLOAT_DTYPES,
    FLOATS,
    check_dtype,
    check_fingerprint,
    checksum,
    dtype_name,
    fingerprint,
    parse_json,
    parse_safetensors,
    safetensors_bytes,
    same_base,
)
from .io_peft import (
    PREFIX,
    dense_conv_A,
    factor_keys,
    file_factor_shapes,
    from_peft_config,
    grouped_conv_A,
    is_factor_key,
    layout,
    scaling_of,
    to_peft_config,
)
from .layers import LoraAdapter, LoraLayer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_adapter` did.

    ``missing``/``unexpected``: tensor keys the model expected but the file lacks (those
    adapters keep their init, B = 0), and keys in the file nothing used; both are empty
    after a strict load. ``base_checked``: the file carried a base-model fingerprint and it
    was compared (``base_matches`` is its result; False only with ``allow_other_base``).
    """

    adapter: str
    path: Path
    layers: tuple[str, ...]
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    unknown_config_keys: tuple[str, ...] = ()
    writer: str = "unknown"
    base_checked: bool = False
    base_matches: bool | None = None

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.unknown_config_keys) and self.base_matches is not False


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------


def _base_weight(layer: nn.Module, weight_name: str) -> torch.Tensor:
    """The pristine base weight (``lora_base_weight`` while something is merged)."""
    buf = layer._buffers.get("lora_base_weight")
    return buf if buf is not None else cast(torch.Tensor, getattr(layer, weight_name))


def _bias_key(path: str, adapted: Container[str]) -> str:
    """The PEFT key of the bias of the module at ``path`` (an adapted layer's sits in ``base_layer``)."""
    return PREFIX + ".".join(p for p in (path, "base_layer" if path in adapted else "", "bias") if p)


def _module_key(path: str, key: str) -> str:
    """The PEFT key of state-dict entry ``key`` of the fully trained module at ``path``."""
    return PREFIX + (path + "." if path else "") + key


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    *,
    metadata: Mapping[str, str] | None = None,
    original_base: bool = False,
) -> Path:
    """Write adapter ``name`` of ``model`` to folder ``path`` in PEFT's format.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json`` (see the module
    docstring) as one change (:mod:`lorakit.io_folder`): a reader, or a process killed
    at any point of the save, sees the old adapter or the new one; saves into one folder
    from several processes take turns. The config is rewritten only when its content
    changes, so re-saving a training run replaces one file. Saving into the folder the
    adapter was loaded from is safe (loads never memory-map).

    Args:
        metadata: extra string entries for the safetensors header (an integration's own
            facts, e.g. a detector's class names); read back by :func:`read_adapter_files`.
            Keys lorakit itself writes (``format``, ``lorakit_version``, ...) are refused.
        original_base: for an adapter made by a PiSSA/OLoRA init (which replaced the base weights
            by residuals), write it as an ordinary LoRA (rank 2r) on the weights *before* the init,
            so it loads onto the untouched base model with the same outputs (PEFT's
            ``path_initial_model_for_weight_conversion``; :mod:`lorakit.init_svd`). Saved
            without it, the adapter belongs to the residual base, and its base fingerprint
            refuses the original one.

    Returns:
        The folder.

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
        ConfigError: the adapter's layers or scaling cannot be written in PEFT's format, or
            ``metadata`` uses a reserved key or a non-string value; with ``original_base``, the
            adapter was not made by a PiSSA/OLoRA init in this process, or a base weight changed since.
        NonFiniteError: the adapter holds NaN/Inf (a broken adapter is never saved).
        OSError: the folder or a file cannot be written (the message names it); the
            previous adapter is kept.
    """
    folder = Path(path)
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    config = cast(dict[str, LoraConfig], model.__dict__.get(_CONFIGS_ATTR, {})).get(name)
    if not layers or config is None:
        raise AdapterNotFoundError(f"cannot save adapter {name!r} to {folder}: the model has {list_adapters(model)}")
    initials = init_svd.recorded(model, name) if original_base else None
    if original_base:
        if initials is None:
            raise ConfigError(
                f"cannot save adapter {name!r} to {folder} with original_base=True: it was not made by a PiSSA/OLoRA "
                f"init in this process (init={config.init!r}), so its base weights are the original ones already"
            )
        config = replace(config, init="kaiming")  # the file is an ordinary LoRA: PEFT must not re-run the init
    tensors: dict[str, torch.Tensor] = {}
    base: dict[str, Any] = {}
    adapted: list[tuple[str, LoraAdapter]] = []
    for p, layer in layers:
        ad = cast(LoraAdapter, layer.lora[name])
        original = None
        if initials is not None:
            ad, original = init_svd.as_lora_on_original(
                initials[p], ad, _base_weight(layer, layer.lora_handler.weight_name), config.use_rslora, p
            )
        for what, t in (("'s base weight", _base_weight(layer, layer.lora_handler.weight_name)), (".A", ad.A)):
            check_materialised(t, f"{p}{what}", f"adapter {name!r} was not saved to {folder}")
        want = scaling_of(ad.r, ad.alpha, config.use_rslora)
        if abs(float(ad.scaling) - want) > 1e-6 * abs(want):
            raise ConfigError(
                f"cannot save adapter {name!r} to {folder}: {p}.lora.{name}.scaling is {float(ad.scaling)}, but "
                f"r={ad.r}, alpha={ad.alpha} give {want}; PEFT files store only r and alpha"
            )
        for pname, t in (("A", ad.A), ("B", ad.B)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{p}.lora.{name}.{pname} holds NaN/Inf; adapter not saved to {folder}")
        kind = layout(layer.lora_handler)
        A = ad.A.detach()
        if kind == "conv":
            A = dense_conv_A(A, cast(nn.Conv2d, layer).groups)
        a_key, b_key = factor_keys(p, kind)
        tensors[a_key], tensors[b_key] = A, ad.B.detach()
        base[p] = original or fingerprint(_base_weight(layer, layer.lora_handler.weight_name))
        adapted.append((p, ad))
    # the adapter's own copies of what it trains fully, wherever the active adapter stands
    train: list[str] = []
    adapted_paths = {p for p, _ in adapted}
    for entry in owned.owned_by(model, name):
        mine = entry.copies[name]
        if entry.attr:
            tensors[_bias_key(entry.path, adapted_paths)] = cast(nn.Parameter, mine).detach()
            continue
        train.append(entry.path)
        for k, v in cast(nn.Module, mine).state_dict().items():
            tensors[_module_key(entry.path, k)] = v.detach()
    # Own, contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    cfg_text = json.dumps(to_peft_config(model, config, adapted, train), indent=2, sort_keys=True).encode()
    own = {
        "format": "pt",
        "lorakit_version": __version__,
        "lorakit_checksums": json.dumps({k: checksum(v) for k, v in tensors.items()}, sort_keys=True),
        "lorakit_base": json.dumps(base, sort_keys=True),
        "lorakit_config_sha256": config_sha(cfg_text),
    }
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if k in own or not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"cannot save adapter {name!r} to {folder}: metadata keys {bad} are reserved or not str->str")
    _write_folder(folder, safetensors_bytes(tensors, metadata={**extra, **own}), cfg_text)
    return folder


def _write_folder(folder: Path, weights: bytes, config: bytes) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create adapter folder {folder}: {exc.strerror}", str(folder)) from exc
    write_adapter(folder, weights, config)


def copy_adapter(src: str | Path, dst: str | Path) -> Path:
    """Copy the adapter folder ``src`` to the folder ``dst``, byte for byte, as one save.

    The two files are read as one pair with every file-level check of
    :func:`read_adapter_files`, and written as :func:`save_adapter` writes them: a kill or a
    concurrent save at ``dst`` leaves its previous adapter or this one, never a mix.

    Raises:
        The errors of :func:`read_adapter_files` (pickle files are refused); OSError when
        ``dst`` cannot be written (the message names it).
    """
    cfg_file, weights = _locate(Path(src), allow_pickle=False)
    raw: list[bytes] = []

    def parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        raw[:] = [data]  # the bytes of the read that read_pair pairs with the config
        return parse_safetensors(weights, data, floating=is_factor_key)

    cfg_bytes, _ = read_pair(cfg_file, weights, parse)
    _write_folder(Path(dst), raw[0], cfg_bytes)
    return Path(dst)


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


def _locate(path: Path, allow_pickle: bool) -> tuple[Path, Path]:
    """(config file, weights file). Never falls back from a present .safetensors to anything else.

    Anything at ``path`` that is not a folder is taken as the weights file (reading it
    refuses what is not a regular file, e.g. a FIFO).
    """
    if path.is_dir():
        folder = path
        candidates = [folder / WEIGHTS_FILE] + [folder / f"adapter_model{s}" for s in PICKLE_SUFFIXES]
        found = [c for c in candidates if os.path.lexists(c)]
        if not found:
            raise AdapterFileError(folder, f"no {WEIGHTS_FILE} in the folder")
        weights = found[0]
    elif os.path.lexists(path):
        folder, weights = path.parent, path
    else:
        raise AdapterFileError(path, "no such adapter folder")
    if weights.suffix in PICKLE_SUFFIXES and not allow_pickle:
        # No CLI verb reads pickle files, so the way to opt in is named for Python callers only.
        raise UnsafeFormatError(
            weights,
            "refusing a pickle-based weights file (unpickling can run code); save the adapter as "
            f"{WEIGHTS_FILE} (safetensors), or read it from Python with lorakit.load_adapter(..., "
            "allow_pickle=True), which uses torch.load(weights_only=True)",
        )
    if weights.suffix not in PICKLE_SUFFIXES and weights.suffix != ".safetensors":
        raise AdapterFileError(weights, "adapter weights must be a .safetensors file")
    return folder / CONFIG_FILE, weights


def _read_pickle(weights: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterFileError(weights, f"torch.load(weights_only=True) refused or failed: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterFileError(weights, "expected a dict of tensor name -> tensor")
    for k, t in obj.items():
        check_dtype(weights, k, dtype_name(t.dtype), is_factor_key(k))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteTensorError(weights, f"tensor {k!r} holds NaN or Inf values")
    return obj


@dataclass
class _Slot:
    """Where one file tensor goes: factor ``"A"``/``"B"`` of the adapter on ``layer`` (A of a
    conv with ``groups`` > 1 is stored dense), or, for a fully trained module or bias at
    path ``layer``, the adapter's own tensor ``owned`` (a state-dict key of its copy, or "bias")."""

    shape: tuple[int, ...]
    layer: str
    factor: str = ""
    groups: int = 1
    owned: str = ""
    dtype: torch.dtype | None = None  # an owned tensor's dtype (None: a LoRA factor, any float)

    def target(self, model: nn.Module, name: str, layers: Mapping[str, LoraLayer]) -> torch.Tensor:
        """The tensor of adapter ``name`` in ``model`` this slot fills."""
        if self.owned:
            return owned.tensor_of(model, name, self.layer, self.owned)
        ad = cast(LoraAdapter, layers[self.layer].lora[name])
        return ad.A if self.factor == "A" else ad.B


def _plan(
    model: nn.Module, cfg: LoraConfig, file: Path, modules: Mapping[str, nn.Module] | None = None
) -> tuple[dict[str, _Slot], dict[str, str]]:
    """Every key the adapter needs -> its slot, worked out before anything changes; and
    the adapted paths -> their weight names."""
    try:
        found = select_targets(model, cfg)
        for p, module, handler in found:
            handler.check(module, cfg.rank_for(p), p or "<root>")
    except LoraError as exc:
        raise AdapterConfigError(file, f"the adapter does not fit this model: {exc}") from None
    slots: dict[str, _Slot] = {}
    given = dict(modules or {})
    for p, module, handler in found:
        check_materialised(
            getattr(module, handler.weight_name), f"{p or '<root>'}'s weight", f"{file.parent} was not loaded"
        )
        kind = layout(handler)
        a_shape, b_shape = file_factor_shapes(module, handler, cfg.rank_for(p))
        a_key, b_key = factor_keys(p, kind)
        groups = cast(nn.Conv2d, module).groups if kind == "conv" else 1
        slots[a_key] = _Slot(a_shape, p, "A", groups)
        slots[b_key] = _Slot(b_shape, p, "B")
    # fully trained modules and biases go into the adapter's own copies (made by inject):
    # shapes from the base's objects, or from the copies the caller gives
    train = owned.train_paths(model, cfg.train_modules)
    for mpath in train:
        module = given.get(mpath) or cast(nn.Module, owned.base_object(model, mpath))
        for k, v in module.state_dict(keep_vars=True).items():
            check_materialised(v, f"{mpath}.{k}", f"{file.parent} was not loaded")
            slots[_module_key(mpath, k)] = _Slot(tuple(v.shape), mpath, owned=k, dtype=v.dtype)
    adapted = {p for p, _, _ in found}
    for mpath in owned.bias_paths(model, cfg.bias, adapted, train):
        b = cast(nn.Parameter, owned.base_object(model, mpath, "bias"))
        slots[_bias_key(mpath, adapted)] = _Slot(tuple(b.shape), mpath, owned="bias", dtype=b.dtype)
    return slots, {p: h.weight_name for p, _, h in found}


def _base_differs(file: Path, model: nn.Module, metadata: dict[str, str], found: dict[str, str]) -> list[str] | None:
    """Adapted paths whose base weight differs from the file's fingerprint; None when the file has none.

    ``found`` maps each adapted path to its handler's weight name.
    """
    raw = metadata.get("lorakit_base")
    if raw is None:
        return None
    saved = parse_json(file, raw.encode())
    if not isinstance(saved, dict):
        raise AdapterFileError(file, "metadata lorakit_base is not a JSON object")
    differ = []
    for p, weight_name in found.items():
        fp = saved.get(p)
        if fp is None or not same_base(
            check_fingerprint(file, p, fp), _base_weight(model.get_submodule(p), weight_name)
        ):
            differ.append(p)
    return differ


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder read from disk and checked, before anything touches a model.

    ``raw_config`` is the parsed ``adapter_config.json`` (not yet validated as a PEFT
    config); ``tensors`` and ``metadata`` come from the weights file.
    """

    config_file: Path
    weights_file: Path
    raw_config: Any
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_adapter_files(path: str | Path, *, allow_pickle: bool = False) -> AdapterFiles:
    """Read an adapter folder (or its weights file) with every file-level check of
    :func:`load_adapter`: format rules, checksums, finite values, and that the config
    belongs to the weights (``lorakit_config_sha256``).

    A folder that a save is replacing, or that a killed save left after its commit
    point, reads as the old adapter or the new one (:mod:`lorakit.io_folder`).

    Raises:
        UnsafeFormatError, AdapterFileError, DtypeMismatchError, NonFiniteTensorError: as
            :func:`load_adapter`.
    """
    cfg_file, weights = _locate(Path(path), allow_pickle)

    def parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if weights.suffix == ".safetensors":
            return parse_safetensors(weights, data, floating=is_factor_key)
        return _read_pickle(weights, data), {}

    cfg_bytes, (tensors, metadata) = read_pair(cfg_file, weights, parse)
    return AdapterFiles(cfg_file, weights, parse_json(cfg_file, cfg_bytes), tensors, metadata)


@dataclass(frozen=True)
class _Match:
    """An adapter file checked against a model: where each tensor goes (``slots``), the
    adapted paths -> weight names (``paths``), the values to copy (``factors``, in
    lorakit's layout), and what did not match."""

    cfg: LoraConfig
    unknown: list[str]
    slots: dict[str, _Slot]
    paths: dict[str, str]
    factors: dict[str, torch.Tensor]
    missing: list[str]
    unexpected: list[str]
    differ: list[str] | None


def _match(
    model: nn.Module,
    files: AdapterFiles,
    *,
    strict: bool,
    allow_other_base: bool,
    modules: Mapping[str, nn.Module] | None = None,
) -> _Match:
    """Check ``files`` against ``model`` without changing it (the checks of :func:`load_adapter`)."""
    cfg_file, weights, tensors = files.config_file, files.weights_file, files.tensors
    cfg, unknown = from_peft_config(cfg_file, files.raw_config, strict, fingerprinted="lorakit_base" in files.metadata)
    slots, paths = _plan(model, cfg, cfg_file, modules)

    missing = sorted(set(slots) - set(tensors))
    unexpected = sorted(set(tensors) - set(slots))
    if len(missing) == len(slots):
        raise KeyMismatchError(weights, missing, unexpected, "no tensor in the file matches the model")
    if strict and (missing or unexpected):
        raise KeyMismatchError(weights, missing, unexpected, "strict=False loads the matching keys and reports these")
    for key, slot in slots.items():
        if key in tensors and tuple(tensors[key].shape) != slot.shape:
            actual = tuple(tensors[key].shape)
            hint = ""
            if slot.factor == "A" and actual[1:] == slot.shape[1:]:
                hint = f"the config gives {slot.layer} rank {slot.shape[0]}, the tensor has rank {actual[0]}"
            raise ShapeMismatchError(weights, key, slot.shape, actual, hint)
    _check_dtypes(weights, slots, tensors)
    factors = {k: grouped_conv_A(weights, k, tensors[k], s.groups) for k, s in slots.items() if k in tensors}

    differ = _base_differs(weights, model, files.metadata, paths)
    if differ:
        if not allow_other_base:
            raise BaseModelMismatchError(weights, differ)
        warnings.warn(str(BaseModelMismatchError(weights, differ)), stacklevel=3)
    return _Match(cfg, unknown, slots, paths, factors, missing, unexpected, differ)


def _check_dtypes(weights: Path, slots: dict[str, _Slot], tensors: dict[str, torch.Tensor]) -> None:
    """A tensor copied into a floating model tensor (or a LoRA factor) must be floating point
    (it is cast to the model's dtype); one copied into a non-floating model tensor (BatchNorm's
    int64 ``num_batches_tracked``) must have exactly its dtype: a cast could wrap or truncate."""
    for key, slot in slots.items():
        t = tensors.get(key)
        if t is None:
            continue
        want = slot.dtype
        if want is None or want.is_floating_point:
            if t.dtype not in FLOAT_DTYPES.values():
                raise DtypeMismatchError(weights, key, FLOATS, dtype_name(t.dtype), "the model's tensor is floating")
        elif t.dtype != want:
            raise DtypeMismatchError(weights, key, dtype_name(want), dtype_name(t.dtype), "the model's tensor has it")


def load_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    *,
    strict: bool = True,
    allow_other_base: bool = False,
    allow_pickle: bool = False,
    modules: Mapping[str, nn.Module] | None = None,
) -> LoadReport:
    """Load an adapter folder written by lorakit or PEFT into ``model`` as adapter ``name``.

    Builds a :class:`LoraConfig` from ``adapter_config.json`` (``target_modules`` list ->
    ``targets``, a regex string -> ``"re:" + regex``, ``lora_alpha`` -> ``alpha``,
    ``modules_to_save`` -> ``train_modules``, ...), checks the file against the model, then
    :func:`lorakit.inject` s it and copies the tensors (cast to the model's dtype). The new
    adapter becomes the active one. ``train_modules`` and saved biases go into the
    adapter's own copies (:mod:`lorakit.owned`); the base's stay as they were.

    Everything is checked before the model changes; if anything still fails, the model is
    restored exactly (adapter removed, weights, active adapters and ``requires_grad`` back).

    Args:
        path: the adapter folder (or its weights file).
        strict: missing or unexpected tensor keys and unknown config keys raise (default);
            with ``strict=False`` they are listed in the report instead. A file matching no
            key at all always raises.
        allow_other_base: load even when the file's base-model fingerprint shows other base
            weights (a ``warnings.warn`` says so).
        allow_pickle: read ``adapter_model.bin/.pt/.pth`` with ``torch.load(weights_only=True)``
            when the folder has no safetensors file. Off by default: those are refused.
        modules: the adapter's own copies of some ``train_modules`` paths (as :func:`lorakit.inject`),
            e.g. a head resized to the file's class count; the file's tensors go into them.

    Raises:
        ConfigError: the model already has an adapter ``name``.
        UnsafeFormatError: a pickle-based file without ``allow_pickle``.
        AdapterFileError: a missing, unreadable or malformed file (not a regular file, too
            large, truncated, bad header, duplicate keys, overlapping offsets, trailing bytes,
            checksum mismatch, malformed lorakit metadata, ...).
        AdapterConfigError: bad/unknown config keys, unsupported PEFT features, or targets
            that do not fit this model.
        KeyMismatchError, ShapeMismatchError: tensors and config/model disagree.
        DtypeMismatchError: a LoRA factor that is not F16/BF16/F32/F64, any float8 tensor, a
            non-floating tensor for a floating model tensor, or another dtype than the model's
            for a non-floating one (e.g. BatchNorm's int64 ``num_batches_tracked``).
        NonFiniteTensorError: a tensor holds NaN/Inf.
        BaseModelMismatchError: other base weights, without ``allow_other_base``.
    """
    p = Path(path)
    if name in list_adapters(model) or name in model.__dict__.get(_CONFIGS_ATTR, {}):
        raise ConfigError(f"cannot load {p} as adapter {name!r}: the model already has it; delete_adapter it first")
    files = read_adapter_files(p, allow_pickle=allow_pickle)
    m = _match(model, files, strict=strict, allow_other_base=allow_other_base, modules=modules)
    _apply(model, m.cfg, name, m.slots, m.factors, modules)
    return LoadReport(
        adapter=name,
        path=p,
        layers=tuple(m.paths),
        loaded=len(m.factors),
        missing=tuple(m.missing),
        unexpected=tuple(m.unexpected),
        unknown_config_keys=tuple(m.unknown),
        writer=f"lorakit {files.metadata['lorakit_version']}" if "lorakit_version" in files.metadata else "unknown",
        base_checked=m.differ is not None,
        base_matches=None if m.differ is None else not m.differ,
    )


def _apply(
    model: nn.Module,
    cfg: LoraConfig,
    name: str,
    slots: dict[str, _Slot],
    values: dict[str, torch.Tensor],
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    """Inject and copy; on any failure put the model back exactly as it was (every value
    goes into the new adapter's own tensors, so removing it is enough)."""
    grads = [(q, q.requires_grad) for q in model.parameters()]
    active = active_adapters(model)
    injected = False
    try:
        inject(model, cfg, name, modules=modules)
        injected = True
        layers = dict(lora_layers(model))
        with torch.no_grad():
            for key, value in values.items():
                slots[key].target(model, name, layers).copy_(value)
    except BaseException:
        if injected:
            delete_adapter(model, name)
            if active:
                set_adapter(model, active)
        for q, g in grads:
            q.requires_grad_(g)
        raise
