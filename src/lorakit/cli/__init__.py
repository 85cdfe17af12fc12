"""The ``lorakit`` command: ``lorakit VERB key=value ...``, as ``yolo`` users type.

Each verb is one small module calling only the public API. Values are parsed
with :func:`ast.literal_eval` (never ``eval``); ``a,b`` is a list of strings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..errors import LoraError
from .args import ArgError, did_you_mean

USAGE = """usage: lorakit VERB key=value ...

verbs:
  inspect   list the layers LoRA can adapt in a model, and the parameter budget
            lorakit inspect model=torchvision.models:resnet18 r=8 [targets=...] [target_types=...]
            (model=/base=: package.module:factory, a transformers model folder, or a YOLO .pt/.yaml)
  merge     load an adapter into its base model strictly, merge it, write the merged state_dict
            lorakit merge base=pkg.module:factory|MODEL_DIR adapter=DIR out=FILE.safetensors
                          [args=...] [root=DIR] [overwrite=False] [allow_other_base=False]
  diff      what two adapter files differ in (config keys, tensors, shapes, values)
            lorakit diff a=DIR b=DIR [atol=0]      exit 0 identical, 1 different, 2 error
  hf        transformers models: LoRA training on JSONL data, generation with an adapter
            lorakit hf train model=DIR data=FILE.jsonl out=DIR [r=16] [epochs=3] [resume=True]
            lorakit hf generate model=DIR adapter=DIR prompt=TEXT
            lorakit hf compare model=DIR data=FILE.jsonl [epochs=3] [base_data=FILE.jsonl] [strategies=...]
  yolo      Ultralytics YOLO (detect, segment, pose, obb, classify) as `yolo` users type: LoRA training,
            and base + adapter served
            lorakit yolo train model=base.pt data=data.yaml [epochs=100] [imgsz=640] [r=8] [any YOLO setting]
            lorakit yolo val|predict|export model=base.pt adapter=DIR [data=...|source=...|format=onnx]
            lorakit yolo merge model=base.pt adapter=DIR out=merged.pt [overwrite=False]
            lorakit yolo compare model=base.pt data=data.yaml [epochs=20] [base_data=old.yaml] [strategies=...]
  serve     HTTP servers of one base with many adapters chosen per request (extra: serve)
            lorakit serve yolo|llm model=... adapters=DIR [port=8000]
  version   print the lorakit version
"""


def _verbs() -> dict[str, Callable[[list[str]], int]]:
    from . import diff as diff_verb
    from . import inspect as inspect_verb
    from . import merge as merge_verb

    return {
        "diff": diff_verb.run,
        "hf": _hf,
        "inspect": inspect_verb.run,
        "merge": merge_verb.run,
        "serve": _serve,
        "version": _version,
        "yolo": _yolo,
    }


def _hf(argv: list[str]) -> int:
    # Imported on use: it pulls in transformers.
    from ..hf.cli import run

    return run(argv)


def _serve(argv: list[str]) -> int:
    # Imported on use: it pulls in fastapi and the model libraries.
    from ..serve.cli import run

    return run(argv)


def _yolo(argv: list[str]) -> int:
    # Imported on use: it pulls in ultralytics (after switching it to offline mode).
    from ..yolo.cli import run

    return run(argv)


def _version(argv: list[str]) -> int:
    from .._version import __version__

    print(__version__)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script. Returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    verbs = _verbs()
    verb = verbs.get(args[0])
    if verb is None:
        hint = did_you_mean(args[0], verbs)
        print(f"lorakit: unknown verb {args[0]!r}{hint}; verbs are {sorted(verbs)}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return verb(args[1:])
    except (ArgError, LoraError) as exc:
        print(f"lorakit {args[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
