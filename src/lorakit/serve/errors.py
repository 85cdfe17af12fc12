"""The server's errors, each with the HTTP status it is answered with (:mod:`lorakit.serve.app`).

They subclass the core's errors (a bad name is a :class:`~lorakit.errors.ConfigError`, an
unknown one an :class:`~lorakit.errors.AdapterNotFoundError`), so library callers of
:class:`~lorakit.serve.store.AdapterStore` catch them as they catch the core's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import AdapterNotFoundError, ConfigError, LoraError


class ServeError(LoraError):
    """Base of the errors a request is answered with; ``status`` is the HTTP status code."""

    status = 500


class BadRequestError(ServeError, ValueError):
    """Malformed JSON, a field of the wrong type, an undecodable image (400)."""

    status = 400


class AdapterNameError(BadRequestError, ConfigError):
    """An adapter name that is not a plain folder name of the store, or that leads out of it (400)."""


class UnknownAdapterError(ServeError, AdapterNotFoundError):
    """No adapter of that name in the store (404); ``available`` lists the names there are."""

    status = 404

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = list(available)
        super().__init__(f"no adapter {name!r} in the store; available: {self.available}")


class PayloadTooLargeError(ServeError, ValueError):
    """A request body (or a decoded image) over the server's limit (413)."""

    status = 413


class AdapterLoadError(ServeError, ValueError):
    """The adapter's files could not be read or loaded (500): the message says which file and why.
    Only the requests for that adapter get it; the server serves the others."""

    status = 500


class CacheFullError(ServeError, RuntimeError):
    """The adapter does not fit the memory budget, and every cached adapter is pinned or in use (503)."""

    status = 503
