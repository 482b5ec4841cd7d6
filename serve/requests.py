"""Reading request bodies before they join a batch: size, content type, JSON, image decoding.

Everything here runs in the request's own handler, so a bad request is answered (400, 413, 415)
without ever reaching the batch its neighbours are in. No Ray here.
"""

from __future__ import annotations

import base64
import binascii
import json

from vdm_engine.images import DecodedImage, decode_image

__all__ = ["RequestError", "IMAGE_TYPES", "check_length", "parse_images", "parse_json", "media_type"]

#: Content types taken as an encoded image (the format itself is read from the bytes).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")
JSON_TYPE = "application/json"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(body: bytes, *, what: str, expected: str):
    """``body`` as JSON; ``RequestError`` 400 naming ``what`` and the ``expected`` shape when it is
    empty or not JSON."""
    if not body:
        raise RequestError(400, f"empty body; expected {expected}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"{what} is not valid JSON: {e}") from None


def media_type(content_type: str | None) -> str:
    """``"image/png; charset=x"`` -> ``"image/png"`` (lower case; empty when missing)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_length(content_length: str | None, limit: int) -> None:
    """413 before reading a body whose declared ``Content-Length`` is over ``limit`` bytes."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise RequestError(400, f"Content-Length {content_length!r} is not a number") from None
    if n > limit:
        raise RequestError(413, f"request body is {n} bytes, above the limit of {limit} bytes "
                                "(vdm-serve --max-body-mb)")


def _too_large(n: int, limit: int) -> RequestError:
    return RequestError(413, f"request body is over {limit} bytes (read {n} so far); the limit is "
                             "vdm-serve --max-body-mb")


def parse_images(body: bytes, content_type: str | None, *, max_images: int, max_pixels: int | None,
                 model_size: tuple[int, int] | None) -> tuple[list[DecodedImage], bool]:
    """Decode a request body into images.

    Args:
        body: the raw body (already bounded in size by the caller).
        content_type: ``image/png``, ``image/jpeg`` (or ``application/octet-stream``): one
            encoded image; ``application/json``: ``{"images": [base64, ...]}``.

    Returns:
        (decoded images, whether the body was JSON).

    Raises:
        RequestError: 415 for another content type, 400 for an empty, truncated or non-image
        body, bad JSON or base64, or an image over ``max_pixels``; 413 for more than ``max_images``.
    """
    kind = media_type(content_type)
    if kind in IMAGE_TYPES:
        return [_decode(body, "body", max_pixels, model_size)], False
    if kind != JSON_TYPE:
        shown = kind or "none"
        raise RequestError(415, f"unsupported Content-Type {shown}; send one PNG or JPEG image as image/png or "
                                "image/jpeg, or JSON {\"images\": [base64, ...]} as application/json")
    doc = parse_json(body, what="body", expected="JSON {\"images\": [base64, ...]}")
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise RequestError(400, "JSON body must be an object {\"images\": [base64, ...]} with at least one image")
    if len(images) > max_images:
        raise RequestError(413, f"{len(images)} images in one request, above the limit of {max_images} "
                                "(vdm-serve --max-images); split the request")
    decoded = []
    for i, item in enumerate(images):
        name = f"images[{i}]"
        if not isinstance(item, str):
            raise RequestError(400, f"{name} is {type(item).__name__}; expected a base64 string")
        if item.startswith("data:") and "," in item:  # a data URL: data:image/png;base64,....
            item = item.split(",", 1)[1]
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"{name} is not valid base64: {e}") from None
        decoded.append(_decode(data, name, max_pixels, model_size))
    return decoded, True


def _decode(data: bytes, name: str, max_pixels, model_size) -> DecodedImage:
    try:
        return decode_image(data, name=name, max_pixels=max_pixels, model_size=model_size)
    except ValueError as e:
        raise RequestError(400, " ".join(str(e).split())) from None
