"""API key format: `sk-gw-<12-char public id>-<32-char secret>`.

The public id is safe to log and show (it is the display prefix's tail); only HMAC-SHA-256(pepper, key) is
stored. 32 base62 characters of secret carry ~190 bits of randomness. A keyed hash rather than a slow password
hash is right here: the secret is random, not a human password, and the hot path must not spend milliseconds.
"""

from __future__ import annotations

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


def hash_key(pepper: bytes, raw_key: str) -> bytes:
    return hmac.digest(pepper, raw_key.encode(), "sha256")


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
