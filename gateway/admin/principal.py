"""Who is calling the admin API or the dashboard, and what that role may do.

Two roles:
- organisation admin: an admin key (config `admin.keys`, or `gateway admin-keys create`), or an SSO identity
  listed in `dashboard.sso_org_admins`; may do everything.
- team admin: an API key flagged `team_admin`, or an SSO identity in `dashboard.sso_team_admins`; sees and changes
  only its own team. Every check below raises `Forbidden` (403), so a wrong role never reaches another team's data.

Credentials are checked against SQL on every call (off the event loop): admin traffic is light, and a revoked key
stops working at once, dashboard sessions included.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa

from gateway.admin import credentials
from gateway.admin.errors import Forbidden
from gateway.auth import keys
from gateway.db.engine import as_utc
from gateway.db.schema import admin_keys, api_keys, teams, users
from gateway.errors import AuthenticationFailed

Role = Literal["org_admin", "team_admin"]
_INVALID = "Incorrect admin key provided. Use an organisation admin key or a team admin API key."


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    actor: str  # for the audit log: "admin:sk-gwadm-…", "config-admin:1", "team-admin:sk-gw-…", "sso:alice@…"
    team_id: int | None = None  # team admins only
    team_name: str | None = None

    @property
    def is_org_admin(self) -> bool:
        return self.role == "org_admin"

    def require_org_admin(self, what: str) -> None:
        if not self.is_org_admin:
            raise Forbidden(f"Only organisation admins may {what}.")

    def require_team(self, team_id: int | None) -> None:
        """Team admins may touch only their own team; the message never says whether the other team exists."""
        if not self.is_org_admin and (team_id is None or team_id != self.team_id):
            raise Forbidden("Team admins may only see and change their own team.")

    def team_filter(self, team_id: int | None) -> int | None:
        """The team a listing is limited to: the asked one for org admins (None: all), always their own for team
        admins (asking for another is refused)."""
        if self.is_org_admin:
            return team_id
        if team_id is not None:
            self.require_team(team_id)
        return self.team_id


def config_key_hashes(pepper: bytes, configured: list[str]) -> list[bytes]:
    return [keys.hash_key(pepper, key) for key in configured]


def authenticate(connection: sa.Connection, pepper: bytes, config_hashes: list[bytes], raw: str) -> Principal:
    """The principal behind a bearer credential, or AuthenticationFailed (401) / Forbidden (403: a valid API key
    that is not a team admin key)."""
    digest = keys.hash_key(pepper, raw)
    admin_id = credentials.parse_key_id(raw)
    if admin_id is not None:
        row = connection.execute(sa.select(admin_keys).where(admin_keys.c.id == admin_id)).mappings().first()
        if row is not None and hmac.compare_digest(bytes(row["secret_hmac"]), digest):
            if row["revoked_at"] is not None:
                raise AuthenticationFailed("This admin key has been revoked.")
            return Principal(role="org_admin", actor=f"admin:{credentials.display_prefix(admin_id)}")
        raise AuthenticationFailed(_INVALID)
    matched = [hmac.compare_digest(digest, expected) for expected in config_hashes]  # compare all: no early exit
    if any(matched):
        return Principal(role="org_admin", actor=f"config-admin:{matched.index(True) + 1}")
    key_id = keys.parse_key_id(raw)
    if key_id is None:
        raise AuthenticationFailed(_INVALID)
    return _team_admin(connection, key_id, digest)


def _team_admin(connection: sa.Connection, key_id: str, digest: bytes | None) -> Principal:
    """The team admin behind an API key id; `digest` is checked when given (None: a session already proved it)."""
    query = (
        sa.select(
            api_keys.c.secret_hmac,
            api_keys.c.revoked_at,
            api_keys.c.expires_at,
            api_keys.c.team_admin,
            api_keys.c.team_id,
            teams.c.name.label("team_name"),
            teams.c.disabled.label("team_disabled"),
            users.c.disabled.label("user_disabled"),
        )
        .join(teams, teams.c.id == api_keys.c.team_id)
        .outerjoin(users, users.c.id == api_keys.c.user_id)
        .where(api_keys.c.id == key_id)
    )
    row = connection.execute(query).mappings().first()
    if row is None or (digest is not None and not hmac.compare_digest(bytes(row["secret_hmac"]), digest)):
        raise AuthenticationFailed(_INVALID)
    expires_at = as_utc(row["expires_at"])
    if row["revoked_at"] is not None or row["team_disabled"] or row["user_disabled"]:
        raise AuthenticationFailed("This API key is not active.")
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise AuthenticationFailed("This API key has expired.")
    if not row["team_admin"]:
        raise Forbidden("This API key is not a team admin key: it cannot use the admin API.")
    return Principal(
        role="team_admin",
        actor=f"team-admin:{keys.display_prefix(key_id)}",
        team_id=int(row["team_id"]),
        team_name=row["team_name"],
    )


def team_admin_by_id(connection: sa.Connection, key_id: str) -> Principal:
    """Re-check a team admin key known by id only (a dashboard session): still active, still flagged."""
    return _team_admin(connection, key_id, None)


def admin_key_by_id(connection: sa.Connection, key_id: str) -> Principal:
    """Re-check an organisation admin key known by id only (a dashboard session): it exists and is not revoked."""
    revoked = connection.execute(sa.select(admin_keys.c.revoked_at).where(admin_keys.c.id == key_id)).first()
    if revoked is None or revoked.revoked_at is not None:
        raise AuthenticationFailed("This admin key has been revoked.")
    return Principal(role="org_admin", actor=f"admin:{credentials.display_prefix(key_id)}")


def sso_principal(
    connection: sa.Connection, identity: str, org_admins: list[str], team_admins: dict[str, list[str]]
) -> Principal | None:
    """The principal of an identity passed by a trusted SSO proxy, or None when it has no admin role."""
    if identity in org_admins:
        return Principal(role="org_admin", actor=f"sso:{identity}")
    for team_name, identities in team_admins.items():
        if identity in identities:
            row = connection.execute(sa.select(teams.c.id, teams.c.disabled).where(teams.c.name == team_name)).first()
            if row is not None and not row.disabled:
                return Principal(role="team_admin", actor=f"sso:{identity}", team_id=int(row.id), team_name=team_name)
    return None
