"""Request signatures, as the provider's public documentation settles section 1.3.

Send: md5(user + from + every phone in the order sent + txt + secret_key), lower-case hex,
over the raw text (not URL-encoded); without txt (picture only) the txt part is left out.
Nothing else is signed. With a charset other than UTF-8 the text is signed as the bytes
that are sent. Upload: md5(login + md5_hex(file bytes) + secret_key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def sign_send(*, user: str | bytes, sender: str | bytes, phones: Sequence[str | bytes],
              txt: str | bytes | None, secret_key: str | bytes) -> str:
    """Bytes are signed as they are (the provider stand-in checks what arrived on the wire)."""
    parts = [_b(user), _b(sender), *(_b(p) for p in phones)]
    if txt is not None:
        parts.append(_b(txt))
    parts.append(_b(secret_key))
    return hashlib.md5(b"".join(parts)).hexdigest()


def sign_upload(*, login: str, image: bytes, secret_key: str, uppercase_inner: bool = False
                ) -> str:
    inner = hashlib.md5(image).hexdigest()
    if uppercase_inner:  # the provider document's own example writes it in upper case
        inner = inner.upper()
    return hashlib.md5(_b(login) + inner.encode("ascii") + _b(secret_key)).hexdigest()
