"""Organisation admin keys: `sk-gwadm-<12-char id>-<32-char secret>`, hashed exactly like API keys.

A distinct prefix keeps an admin key from ever being accepted on `/v1/` (its id is not in the API key table) and
makes a leaked one easy to recognise in secret scanners. Created with `gateway admin-keys create`, revoked with
`gateway admin-keys revoke`; keys given in the config (`admin.keys`) work alongside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from gateway.auth import keys
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import admin_keys

PREFIX = "sk-gwadm-"
_API_PREFIX_LENGTH = len(keys.PREFIX)


@dataclass(frozen=True, slots=True)
class NewAdminKey:
    key_id: str
    secret: str

    @property
    def display_prefix(self) -> str:
        return display_prefix(self.key_id)


def display_prefix(key_id: str) -> str:
    return f"{PREFIX}{key_id}"


def generate() -> NewAdminKey:
    api_key = keys.generate()  # the same randomness and shape; only the prefix differs
    return NewAdminKey(key_id=api_key.key_id, secret=PREFIX + api_key.secret[_API_PREFIX_LENGTH:])


def parse_key_id(raw: str) -> str | None:
    if not raw.startswith(PREFIX):
        return None
    return keys.parse_key_id(keys.PREFIX + raw[len(PREFIX) :])


def create_admin_key(connection: sa.Connection, pepper: bytes, name: str | None) -> NewAdminKey:
    new_key = generate()
    connection.execute(
        admin_keys.insert().values(
            id=new_key.key_id, secret_hmac=keys.hash_key(pepper, new_key.secret), name=name, created_at=utcnow()
        )
    )
    return new_key


def list_admin_keys(connection: sa.Connection) -> list[dict[str, Any]]:
    rows = connection.execute(sa.select(admin_keys).order_by(admin_keys.c.created_at)).mappings().all()
    return [
        {
            "prefix": display_prefix(row["id"]),
            "name": row["name"],
            "created_at": as_utc(row["created_at"]),
            "last_used_at": as_utc(row["last_used_at"]),
            "revoked_at": as_utc(row["revoked_at"]),
            "state": "revoked" if row["revoked_at"] is not None else "active",
        }
        for row in rows
    ]


def admin_key_id(reference: str) -> str:
    """Accept an id, a display prefix or the whole key."""
    reference = reference.strip()
    if reference.startswith(PREFIX):
        reference = reference[len(PREFIX) :][: keys.ID_LENGTH]
    return reference


def revoke_admin_key(connection: sa.Connection, reference: str) -> bool:
    result = connection.execute(
        admin_keys.update()
        .where(admin_keys.c.id == admin_key_id(reference), admin_keys.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)
