"""Images for upload: recognised by their bytes, never by the file name."""

from __future__ import annotations

# The provider's public documentation: "Maximum size: 10 Mb" (provider-api.txt still says 20).
MAX_IMAGE_BYTES = 10 * 1024 * 1024

SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
)


class BadImage(ValueError):
    """The file is not an image the provider takes, or is too large."""


def image_type(data: bytes) -> tuple[str, str]:
    """(MIME type, extension) of a JPG, PNG or GIF; BadImage for anything else."""
    for magic, mime, ext in SIGNATURES:
        if data.startswith(magic):
            return mime, ext
    raise BadImage("not a JPG, PNG or GIF image (judged by its content, not its name)")


def check_image(data: bytes, *, max_bytes: int) -> tuple[str, str]:
    if not data:
        raise BadImage("the image is empty")
    if len(data) > max_bytes:
        raise BadImage(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    return image_type(data)
