"""API key format: `sk-gw-<12-char public id>-<32-char secret>`.

The public id is safe to log and show (it is the display prefix's tail); only HMAC-SHA-256(pepper, key) is
stored. 32 base62 characters of secret carry ~190 bits of randomness. A keyed hash rather than a slow password
hash is right here: the secret is random, not a human password, and the hot path must not spend milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

PREFIX = "sk-gw-"
ID_LENGTH = 12
SECRET_LENGTH = 32
KEY_LENGTH = len(PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH
_ALPHABET = string.ascii_letters + string.digits
_ALPHABET_SET = frozenset(_ALPHABET)


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    secret: str  # the whole key, shown once

    @property
    def display_prefix(self) -> str:
        return display_prefix(self.key_id)


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def generate() -> NewKey:
    key_id = _random(ID_LENGTH)
    return NewKey(key_id=key_id, secret=f"{PREFIX}{key_id}-{_random(SECRET_LENGTH)}")


def display_prefix(key_id: str) -> str:
    return f"{PREFIX}{key_id}"


def parse_key_id(raw_key: str) -> str | None:
    """The public id of a well-formed key, else None. No secret-dependent branching beyond the shape."""
    if len(raw_key) != KEY_LENGTH or not raw_key.startswith(PREFIX) or raw_key[len(PREFIX) + ID_LENGTH] != "-":
        return None
    key_id = raw_key[len(PREFIX) : len(PREFIX) + ID_LENGTH]
    if not _ALPHABET_SET.issuperset(key_id):
        return None
    return key_id


class _Hasher:
    """HMAC-SHA-256 with the key's pads hashed once: each check only copies two SHA-256 states. (OpenSSL's
    one-shot HMAC sets the key up again on every call and releases the GIL around it: both cost on the hot path.)"""

    __slots__ = ("_inner", "_outer")

    def __init__(self, pepper: bytes) -> None:
        block = hashlib.sha256(pepper).digest() if len(pepper) > 64 else pepper
        block = block.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_hashers: dict[bytes, _Hasher] = {}


def hash_key(pepper: bytes, raw_key: str) -> bytes:
    hasher = _hashers.get(pepper)
    if hasher is None:
        hasher = _hashers[pepper] = _Hasher(pepper)
    return hasher.digest(raw_key.encode())


def matches(pepper: bytes, raw_key: str, stored: bytes) -> bool:
    return hmac.compare_digest(hash_key(pepper, raw_key), stored)


def load_pepper(pepper: str | None, pepper_file: str | None) -> bytes:
    """The configured pepper, else the one in `pepper_file`, created (mode 0600) on first use."""
    if pepper:
        return pepper.encode()
    assert pepper_file is not None  # settings guarantee one of the two
    import os
    from pathlib import Path

    path = Path(pepper_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race; use its pepper
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
    value = path.read_text().strip()
    if len(value) < 16:
        raise ValueError(f"pepper file {path} holds fewer than 16 characters")
    return value.encode()
