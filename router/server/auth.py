"""Write keys: which source (if any) a request speaks for.

Segment's rules: HTTP Basic with the write key as the user name and an empty password
(``key:``; ``key`` without the colon is accepted too), or ``writeKey`` in the JSON body, which
is what analytics.js in the browser sends. ``Authorization: Bearer <write key>`` is accepted
too: Customer.io's Data Pipelines libraries send their regional keys (``pk_us_...``) that way.
A wrong, missing or malformed key is one and the same 401.

Timing: presented keys are hashed with SHA-256 and the digest is compared with
``hmac.compare_digest`` against the digest of *every* configured key, without stopping at a
match. Hashing first means the comparison never sees the secret's length, and comparing all of
them means the time taken does not say whether, or where, a key matched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from router.config import SourceConfig
from router.server.problems import unauthorized


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    source: str


class WriteKeys:
    """The configured write keys, kept only as digests, and the source each belongs to."""

    def __init__(self, sources: Sequence[SourceConfig]) -> None:
        self._keys = tuple(_Key(_digest(secret.get_secret_value()), source.name)
                           for source in sources for secret in source.write_keys)

    @property
    def empty(self) -> bool:
        """No source is configured: every request is refused (said loudly at startup)."""
        return not self._keys

    def source_for(self, key: str) -> str:
        """The name of the source whose write key ``key`` is; ``Problem`` 401 otherwise."""
        presented = _digest(key)
        matched: str | None = None
        for candidate in self._keys:
            # No early exit: every configured digest is compared every time.
            if hmac.compare_digest(candidate.digest, presented) and matched is None:
                matched = candidate.source
        if matched is None or not key:
            raise unauthorized()
        return matched


def key_from_header(authorization: str | None) -> str | None:
    """The write key in an ``Authorization: Basic ...`` or ``Bearer ...`` header, None when
    there is no header.

    Raises the common 401 for anything malformed: another scheme, bad base64, bytes that are
    not UTF-8, an empty user name. The password part is ignored, as Segment does.
    """
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if not token or scheme.lower() not in ("basic", "bearer"):
        raise unauthorized()
    if scheme.lower() == "bearer":
        return token
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise unauthorized() from None
    user, _, _password = decoded.partition(":")
    if not user:
        raise unauthorized()
    return user


def key_from_body(document: dict[str, object]) -> str:
    """The ``writeKey`` field of a body; the common 401 when it is missing or not a string."""
    key = document.get("writeKey")
    if not isinstance(key, str) or not key:
        raise unauthorized()
    return key


def _digest(key: str) -> bytes:
    # ``surrogatepass``: a key parsed from JSON may hold a lone surrogate; it must hash (and
    # fail to match) like any other wrong key rather than raise.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


__all__ = ["WriteKeys", "key_from_body", "key_from_header"]
