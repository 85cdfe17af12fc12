"""Images in a JSON request: base64 strings (optionally ``data:image/...;base64,`` URLs) decoded with Pillow."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from .errors import BadRequestError, PayloadTooLargeError


def decode_images(payload: dict[str, Any], *, max_images: int, max_pixels: int) -> list[Any]:
    """The RGB ``PIL.Image`` s of ``payload["images"]`` (a list of base64 strings) or ``payload["image"]`` (one).

    Raises:
        BadRequestError: no images, not strings, not base64, or not an image Pillow can decode (the
            message gives the image's index).
        PayloadTooLargeError: more than ``max_images`` images, or one over ``max_pixels`` pixels
            (checked from its header, before it is decoded).
    """
    from PIL import Image, UnidentifiedImageError

    items = payload.get("images", [payload["image"]] if "image" in payload else None)
    if not isinstance(items, list) or not items:
        raise BadRequestError('expected "images": a non-empty list of base64-encoded image files (or "image": one)')
    if len(items) > max_images:
        raise PayloadTooLargeError(f"{len(items)} images in one request; the limit is {max_images} (max_images)")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequestError(f"images[{i}]: expected a base64 string, got {type(item).__name__}")
        text = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequestError(f"images[{i}]: not valid base64 ({exc})") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise PayloadTooLargeError(f"images[{i}] is {w}x{h} pixels; the limit is {max_pixels} (max_pixels)")
                im.load()
                out.append(im.convert("RGB"))
        # ImportError: Ultralytics patches Image.open to try HEIF (pi_heif) on data Pillow cannot identify
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            Image.DecompressionBombError,
            SyntaxError,
            ImportError,
        ) as exc:
            raise BadRequestError(
                f"images[{i}]: not an image Pillow can decode ({type(exc).__name__}: {exc})"
            ) from None
    return out
