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
Reading and checking the files is :mod:`lorakit.io_read`; checking them against a model is
:mod:`lorakit.io_match`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import init_svd, owned, state
from ._version import __version__
from .adapters import active_adapters, delete_adapter, list_adapters, set_adapter
from .config import LoraConfig
from .errors import AdapterNotFoundError, ConfigError, NonFiniteError, check_materialised
from .inject import inject
from .io_fingerprint import fingerprint
from .io_folder import CONFIG_FILE, WEIGHTS_FILE, config_sha, read_pair, write_adapter
from .io_format import checksum, encode_owned, parse_safetensors, safetensors_bytes
from .io_match import Slot, base_weight, bias_key, match_files, module_key
from .io_peft import factor_key_test, factor_keys, scaling_of, to_peft_config, variant_keys
from .io_read import PICKLE_SUFFIXES, AdapterFiles, locate, read_adapter_files
from .layers import LoraAdapter
from .state import lora_layers

# The file names belong to the folder protocol (io_folder), reading files to io_read;
# they are importable from here, with the save and load functions.
__all__ = [
    "CONFIG_FILE",
    "PICKLE_SUFFIXES",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "LoadReport",
    "base_fingerprints",
    "copy_adapter",
    "encode_adapter",
    "load_adapter",
    "read_adapter_files",
    "save_adapter",
]


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


def save_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    *,
    metadata: Mapping[str, str] | None = None,
    original_base: bool = False,
    also: str | Path | Sequence[str | Path] = (),
    base_fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
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
        also: another folder, or several, that get the same two files, each written as one save
            after ``path`` (a training run's best adapter, when its last epoch is also its best):
            encoded once.
        base_fingerprints: the adapted layers' base-weight fingerprints by layer path, as
            :func:`base_fingerprints` gives them, for a caller that saves often over base weights
            it knows are frozen (a training run, each epoch): each save then skips reading every
            base weight. None (default): taken from ``model`` now.

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
    weights, cfg_text = encode_adapter(
        model, folder, name, metadata=metadata, original_base=original_base, base_fingerprints=base_fingerprints
    )
    more = [also] if isinstance(also, (str, Path)) else list(also)  # a str is one folder, not its letters
    for each in (folder, *map(Path, more)):
        _write_folder(each, weights, cfg_text)
    return folder


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a parameter sharded by FSDP2 (a ``DTensor``) gathered from every process, any
    other tensor as it is. Duck-typed so that torch builds without ``torch.distributed`` need nothing."""
    gather = getattr(t, "full_tensor", None)
    return cast(torch.Tensor, gather()) if callable(gather) else t


def encode_adapter(
    model: nn.Module,
    path: str | Path,
    name: str = "default",
    *,
    metadata: Mapping[str, str] | None = None,
    original_base: bool = False,
    base_fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[bytes, bytes]:
    """The two files :func:`save_adapter` writes for adapter ``name`` of ``model`` to ``path``
    (``adapter_model.safetensors``, ``adapter_config.json``), without writing them; ``path``
    only names the folder in error messages.

    A model sharded by FSDP2 (``fully_shard``: its parameters are ``DTensor`` shards) is read
    one tensor at a time through ``full_tensor()``, a collective: every process must call this
    for the same adapter, and one of them writes the result (:func:`lorakit.hf.fsdp`).

    Raises:
        The errors of :func:`save_adapter`, but OSError.
    """
    folder = Path(path)
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    config = state.configs(model).get(name)
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
    trained: list[tuple[str, torch.Tensor]] = []  # what must be finite: the factors as the model holds them
    for p, layer in layers:
        ad = cast(LoraAdapter, layer.lora[name])
        w0 = base_weight(layer, layer.lora_handler.weight_name)
        original = None
        if initials is not None:
            ad, original = init_svd.as_lora_on_original(initials[p], ad, w0, config.use_rslora, p)
        for what, t in (("'s base weight", w0), (".A", ad.A)):
            check_materialised(t, f"{p}{what}", f"adapter {name!r} was not saved to {folder}")
        weight = _full(w0.detach())
        want = scaling_of(ad.r, ad.alpha, config.use_rslora)
        if abs(float(ad.scaling) - want) > 1e-6 * abs(want):
            raise ConfigError(
                f"cannot save adapter {name!r} to {folder}: {p}.lora.{name}.scaling is {float(ad.scaling)}, but "
                f"r={ad.r}, alpha={ad.alpha} give {want}; PEFT files store only r and alpha"
            )
        whole = {pname: _full(t.detach()) for pname, t in ad.named_parameters()}  # A, B, a variant's (DoRA)
        trained.extend((f"{p}.lora.{name}.{pname}", t) for pname, t in whole.items())
        handler = layer.lora_handler
        a_key, b_key = factor_keys(p, handler)
        tensors[a_key] = handler.to_file(layer, "A", whole["A"])
        tensors[b_key] = handler.to_file(layer, "B", whole["B"])
        for key, attr in variant_keys(p, ad.variant).items():
            tensors[key] = whole[attr] if attr in whole else cast(torch.Tensor, getattr(ad, attr)).detach()
        base[p] = original or _fingerprint(p, weight, base_fingerprints, folder)
        adapted.append((p, ad))
    # the adapter's own copies of what it trains fully, wherever the active adapter stands
    train: list[str] = []
    adapted_paths = {p for p, _ in adapted}
    for entry in owned.owned_by(model, name):
        mine = entry.copies[name]
        if entry.attr:
            tensors[bias_key(entry.path, adapted_paths)] = _full(cast(nn.Parameter, mine).detach())
            continue
        train.append(entry.path)
        for k, v in cast(nn.Module, mine).state_dict().items():
            tensors[module_key(entry.path, k)] = _full(v.detach())
    _check_finite(trained, f"adapter not saved to {folder}")
    written, encoded = encode_owned(tensors)  # train_modules may share storage (tied weights)
    sums = encoded.checksums() if encoded is not None else {k: checksum(v) for k, v in written.items()}

    cfg_text = json.dumps(to_peft_config(model, config, adapted, train), indent=2, sort_keys=True).encode()
    own = {
        "format": "pt",
        "lorakit_version": __version__,
        "lorakit_checksums": json.dumps(sums, sort_keys=True),
        "lorakit_base": json.dumps(base, sort_keys=True),
        "lorakit_config_sha256": config_sha(cfg_text),
    }
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if k in own or not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"cannot save adapter {name!r} to {folder}: metadata keys {bad} are reserved or not str->str")
    return safetensors_bytes(written, metadata={**extra, **own}, encoded=encoded), cfg_text


def base_fingerprints(model: nn.Module, name: str = "default") -> dict[str, dict[str, Any]]:
    """The fingerprint of each base weight adapter ``name`` of ``model`` adapts, by layer path: the
    ``lorakit_base`` entries :func:`save_adapter` writes (see :mod:`lorakit.io_fingerprint`).

    Raises:
        AdapterNotFoundError: the model has no adapter ``name``.
    """
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    if not layers:
        raise AdapterNotFoundError(
            f"no adapter {name!r} to fingerprint the base of; the model has {list_adapters(model)}"
        )
    return {p: fingerprint(_full(base_weight(layer, layer.lora_handler.weight_name).detach())) for p, layer in layers}


def _fingerprint(
    path: str, weight: torch.Tensor, given: Mapping[str, Mapping[str, Any]] | None, folder: Path
) -> dict[str, Any]:
    """``weight``'s fingerprint: from ``given`` (checked to be of a weight with its dtype and shape) or computed."""
    if given is None:
        return fingerprint(weight)
    fp = given.get(path)
    want = {"dtype": str(weight.dtype).removeprefix("torch."), "shape": list(weight.shape)}
    if fp is None or {k: fp.get(k) for k in want} != want:
        got = None if fp is None else {k: fp.get(k) for k in want}
        raise ConfigError(
            f"cannot save to {folder}: base_fingerprints[{path!r}] is {got}, but the base weight there is {want}"
        )
    return dict(fp)


def _check_finite(named: list[tuple[str, torch.Tensor]], consequence: str) -> None:
    """Raise NonFiniteError naming the first tensor of ``named`` with a NaN/Inf (one pass over all of them
    when none has: a YOLO adapter has ~200 factors, and a check per tensor cost more than the encoding)."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for _, t in named:
        by_kind.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_kind.values()):
        return
    label = next(label for label, t in named if not bool(torch.isfinite(t).all()))
    raise NonFiniteError(f"{label} holds NaN/Inf; {consequence}")


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
    cfg_file, weights = locate(Path(src), allow_pickle=False)
    raw: list[bytes] = []

    def parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        raw[:] = [data]  # the bytes of the read that read_pair pairs with the config
        return parse_safetensors(weights, data, floating=factor_key_test())

    cfg_bytes, _ = read_pair(cfg_file, weights, parse)
    _write_folder(Path(dst), raw[0], cfg_bytes)
    return Path(dst)


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


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
    if name in list_adapters(model) or name in state.configs(model):
        raise ConfigError(f"cannot load {p} as adapter {name!r}: the model already has it; delete_adapter it first")
    files = read_adapter_files(p, allow_pickle=allow_pickle)
    m = match_files(model, files, strict=strict, allow_other_base=allow_other_base, modules=modules)
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
    slots: dict[str, Slot],
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
