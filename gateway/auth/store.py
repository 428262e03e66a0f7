"""The key table every process holds in memory, and the per-request check against it.

The in-memory table is a full snapshot of `api_keys` (joined with teams and users), reloaded whenever the
shared cache version changes. Because it is complete, an unknown key is answered from memory: a flood of bad
keys costs a dict lookup each and never reaches the database (the snapshot is the negative cache).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from gateway.auth import keys
from gateway.db.engine import as_utc
from gateway.db.schema import api_keys, teams, users
from gateway.errors import AuthenticationFailed, ModelNotAllowed


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    secret_hmac: bytes
    name: str | None
    team_id: int
    team_name: str
    user_id: int | None
    user_name: str | None
    allowed_models: frozenset[str] | None  # None: every model
    tags: tuple[str, ...]
    expires_at: float | None  # Unix time
    inactive_reason: str | None  # revoked, team disabled, user disabled

    @property
    def display_prefix(self) -> str:
        return keys.display_prefix(self.key_id)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def _timestamp(value: datetime | None) -> float | None:
    value = as_utc(value)
    return value.timestamp() if value is not None else None


def load_keys(connection: sa.Connection) -> dict[str, KeyRecord]:
    query = (
        sa.select(
            api_keys,
            teams.c.name.label("team_name"),
            teams.c.disabled.label("team_disabled"),
            users.c.name.label("user_name"),
            users.c.disabled.label("user_disabled"),
        )
        .join(teams, teams.c.id == api_keys.c.team_id)
        .outerjoin(users, users.c.id == api_keys.c.user_id)
    )
    records: dict[str, KeyRecord] = {}
    for row in connection.execute(query).mappings():
        if row["revoked_at"] is not None:
            reason: str | None = "revoked"
        elif row["team_disabled"]:
            reason = "team disabled"
        elif row["user_disabled"]:
            reason = "user disabled"
        else:
            reason = None
        allowed = row["allowed_models"]
        records[row["id"]] = KeyRecord(
            key_id=row["id"],
            secret_hmac=bytes(row["secret_hmac"]),
            name=row["name"],
            team_id=row["team_id"],
            team_name=row["team_name"],
            user_id=row["user_id"],
            user_name=row["user_name"],
            allowed_models=frozenset(allowed) if allowed is not None else None,
            tags=tuple(row["tags"] or ()),
            expires_at=_timestamp(row["expires_at"]),
            inactive_reason=reason,
        )
    return records


_NO_MATCH = bytes(32)
_INVALID = "Incorrect API key provided. You can find your API key in your gateway's key management."


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer sk-...'."
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("The Authorization header must be 'Bearer <api key>'.")
    return token.strip()


def authenticate(table: Mapping[str, KeyRecord], pepper: bytes, raw_key: str) -> KeyRecord:
    key_id = keys.parse_key_id(raw_key)
    record = table.get(key_id) if key_id is not None else None
    # Hash even when the id is unknown, so the answer takes the same time either way.
    expected = record.secret_hmac if record is not None else _NO_MATCH
    if not keys.matches(pepper, raw_key, expected) or record is None:
        raise AuthenticationFailed(_INVALID)
    if record.inactive_reason is not None:
        raise AuthenticationFailed(f"This API key is not active ({record.inactive_reason}).")
    if record.expires_at is not None and record.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.")
    return record


def authorize_model(record: KeyRecord, model: str) -> None:
    if not record.may_use(model):
        raise ModelNotAllowed(f"This API key is not allowed to use the model '{model}'.", param="model")
