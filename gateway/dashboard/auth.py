"""Who is looking at the dashboard: a session cookie (from signing in with a key) or, when the operator turned it
on, an identity header set by a trusted SSO proxy. Either way the result is an admin `Principal`, re-checked on
every request."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from gateway.admin import credentials
from gateway.admin.errors import Forbidden
from gateway.admin.principal import Principal, admin_key_by_id, authenticate, sso_principal, team_admin_by_id
from gateway.admin.routing import CONFIG_HASHES, _read
from gateway.auth import keys
from gateway.dashboard.session import COOKIE, PATH, Session, SessionSigner
from gateway.errors import AuthenticationFailed
from gateway.settings import Dashboard
from gateway.state import STATE

SIGNER = web.AppKey("dashboard_signer", SessionSigner)


def config_ident(index: int, digest: bytes) -> str:
    """A config admin key's session id: its position and a fingerprint, so replacing the key ends the session."""
    return f"{index}:{digest[:8].hex()}"


def session_for(raw: str, principal: Principal, hashes: list[bytes], pepper: bytes) -> tuple[str, str]:
    if raw.startswith(credentials.PREFIX):
        return "admin_key", credentials.admin_key_id(raw)
    if principal.actor.startswith("config-admin:"):
        index = int(principal.actor.split(":")[1]) - 1
        return "config_admin", config_ident(index, hashes[index])
    key_id = keys.parse_key_id(raw)
    assert key_id is not None
    return "api_key", key_id


def _from_session(
    connection: sa.Connection, session: Session, hashes: list[bytes], settings: Dashboard
) -> Principal | None:
    try:
        if session.kind == "admin_key":
            return admin_key_by_id(connection, session.ident)
        if session.kind == "api_key":
            return team_admin_by_id(connection, session.ident)
        if session.kind == "config_admin":
            index = int(session.ident.split(":")[0])
            if index < len(hashes) and config_ident(index, hashes[index]) == session.ident:
                return Principal(role="org_admin", actor=f"config-admin:{index + 1}")
            return None
        if session.kind == "sso":
            return sso_principal(connection, session.ident, settings.sso_org_admins, settings.sso_team_admins)
    except (AuthenticationFailed, Forbidden, ValueError):  # Forbidden: the key lost its team admin flag
        return None
    return None


def _trusted(remote: str | None, proxies: list[str]) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


async def run_read(request: web.Request, func: Any, *args: Any) -> Any:
    state = request.app[STATE]
    return await state.sql.run(functools.partial(_read, state.sql.engine, func, *args))


async def current(request: web.Request) -> tuple[Principal, Session, bool] | None:
    """The principal, its session, and whether the session is new (its cookie must be set on the response)."""
    state = request.app[STATE]
    settings = state.settings.dashboard
    signer = request.app[SIGNER]
    hashes = request.app[CONFIG_HASHES]
    session = signer.load(request.cookies.get(COOKIE))
    header = settings.trusted_identity_header
    if header and request.headers.get(header) and _trusted(request.remote, settings.trusted_proxies):
        identity = request.headers[header].strip()
        principal = await run_read(request, sso_principal, identity, settings.sso_org_admins, settings.sso_team_admins)
        if principal is None:
            return None
        fresh = session is None or session.kind != "sso" or session.ident != identity
        if fresh:
            session = signer.new("sso", identity)
        assert session is not None
        return principal, session, fresh
    if session is None:
        return None
    principal = await run_read(request, _from_session, session, hashes, settings)
    return (principal, session, False) if principal is not None else None


async def sign_in(request: web.Request, raw: str) -> tuple[Principal, Session]:
    """Check a pasted key (raises AuthenticationFailed / Forbidden) and open a session for it."""
    state = request.app[STATE]
    hashes = request.app[CONFIG_HASHES]
    principal = await run_read(request, authenticate, state.pepper, hashes, raw)
    kind, ident = session_for(raw, principal, hashes, state.pepper)
    return principal, request.app[SIGNER].new(kind, ident)


def set_cookie(response: web.StreamResponse, request: web.Request, signer: SessionSigner, session: Session) -> None:
    secure = request.app[STATE].settings.dashboard.secure_cookie
    response.set_cookie(
        COOKIE,
        signer.dump(session),
        max_age=int(signer.lifetime_s),
        path=PATH,
        httponly=True,
        samesite="Strict",
        secure=request.secure if secure is None else secure,
    )
