"""``python -m lorakit.cli VERB key=value ...``: the ``lorakit`` command without the console script."""

from . import main

raise SystemExit(main())
