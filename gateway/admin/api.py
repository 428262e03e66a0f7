"""The admin API's endpoints, `/admin/...`. Each is registered with its summary, role and body model, which is
also what `/admin/openapi.json` is built from. Handlers only translate HTTP to the operations in this package."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from gateway import accounts, alerts
from gateway.admin import audit, budgets, credentials, keys, limits, prices, schemas, teams, usage
from gateway.admin.errors import AdminNotFound, Conflict
from gateway.admin.principal import Principal
from gateway.admin.routing import Call, Param, endpoint, json_response
from gateway.db.schema import api_keys
from gateway.db.schema import teams as teams_table
from gateway.db.schema import users as users_table
from gateway.errors import InvalidRequest
from gateway.limits.policy import UNLIMITED, load_overrides
from gateway.metering.cost import usd_to_nano
from gateway.state import GatewayState

TEAM_PARAM = Param("team", "a team name (team admins: only their own)")


def team_id_by_name(connection: sa.Connection, principal: Principal, name: str | None) -> int | None:
    """A team filter given by name. Team admins naming another team get 403 whether it exists or not."""
    if name is None:
        return principal.team_filter(None)
    found = connection.execute(sa.select(teams_table.c.id).where(teams_table.c.name == name)).scalar()
    if found is None:
        principal.require_org_admin("look up other teams")
        raise AdminNotFound(f"Team '{name}' does not exist.", param="team")
    return principal.team_filter(int(found))


def _duration(text: str, param: str) -> timedelta:
    try:
        return accounts.parse_duration(text)
    except accounts.AccountError as exc:
        raise InvalidRequest(str(exc), param=param) from None


def _int_arg(call: Call, name: str, default: int, maximum: int) -> int:
    text = call.arg(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise InvalidRequest(f"{name} must be a number from 1 to {maximum}", param=name)
    return int(text)


# --- who am I ----------------------------------------------------------------------------------------------


@endpoint("GET", "/admin/whoami", summary="The caller's role and team.", tag="session")
async def whoami(call: Call) -> web.StreamResponse:
    principal = call.principal
    return json_response({"role": principal.role, "actor": principal.actor, "team": principal.team_name})


# --- teams ------------------------------------------------------------------------------------------------


@endpoint("GET", "/admin/teams", summary="List teams (team admins: their own).", tag="teams")
async def list_teams(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(teams.list_teams, call.principal)})


@endpoint(
    "POST", "/admin/teams", summary="Create a team.", tag="teams", org_only=True, body=schemas.TeamCreate, status=201
)
async def create_team(call: Call) -> web.StreamResponse:
    created = await call.write(teams.create_team, call.principal, call.body.name, call.request_id)
    return json_response(created, status=201)


@endpoint("GET", "/admin/teams/{team}", summary="Show a team.", tag="teams")
async def get_team(call: Call) -> web.StreamResponse:
    return json_response(await call.read(teams.find_team, call.principal, call.match("team")))


@endpoint(
    "PATCH",
    "/admin/teams/{team}",
    summary="Enable or disable a team (and so all its keys).",
    tag="teams",
    org_only=True,
    body=schemas.TeamUpdate,
)
async def update_team(call: Call) -> web.StreamResponse:
    updated = await call.write(
        teams.set_team_disabled, call.principal, call.match("team"), call.body.disabled, call.request_id
    )
    return json_response(updated)


# --- users ------------------------------------------------------------------------------------------------


@endpoint("GET", "/admin/users", summary="List users (team admins: those holding keys of their team).", tag="users")
async def list_users(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(teams.list_users, call.principal)})


@endpoint(
    "POST", "/admin/users", summary="Create a user.", tag="users", org_only=True, body=schemas.UserCreate, status=201
)
async def create_user(call: Call) -> web.StreamResponse:
    body = call.body
    return json_response(
        await call.write(teams.create_user, call.principal, body.name, body.email, call.request_id), status=201
    )


@endpoint("GET", "/admin/users/{user}", summary="Show a user.", tag="users")
async def get_user(call: Call) -> web.StreamResponse:
    return json_response(await call.read(teams.find_user, call.principal, call.match("user")))


@endpoint(
    "PATCH",
    "/admin/users/{user}",
    summary="Enable or disable a user (and so all their keys).",
    tag="users",
    org_only=True,
    body=schemas.UserUpdate,
)
async def update_user(call: Call) -> web.StreamResponse:
    updated = await call.write(
        teams.set_user_disabled, call.principal, call.match("user"), call.body.disabled, call.request_id
    )
    return json_response(updated)


# --- keys -------------------------------------------------------------------------------------------------


def _list_keys(connection: sa.Connection, principal: Principal, team: str | None) -> list[dict[str, Any]]:
    return keys.list_keys(connection, principal, team_id_by_name(connection, principal, team))


@endpoint("GET", "/admin/keys", summary="List API keys: prefixes only, never secrets.", tag="keys", query=(TEAM_PARAM,))
async def list_keys(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(_list_keys, call.principal, call.arg("team"))})


@endpoint(
    "POST",
    "/admin/keys",
    summary="Create an API key; the secret is in this answer only.",
    tag="keys",
    body=schemas.KeyCreate,
    status=201,
)
async def create_key(call: Call) -> web.StreamResponse:
    body: schemas.KeyCreate = call.body
    created = await call.write(
        keys.create_key,
        call.principal,
        call.state.pepper,
        team=body.team,
        user=body.user,
        models=body.models,
        expires_in=_duration(body.expires_in, "expires_in") if body.expires_in else None,
        name=body.name,
        tags=body.tags,
        team_admin=body.team_admin,
        request_id=call.request_id,
    )
    return json_response(created, status=201)


@endpoint("GET", "/admin/keys/{key}", summary="Show an API key (by prefix).", tag="keys")
async def get_key(call: Call) -> web.StreamResponse:
    return json_response(await call.read(keys.get_key, call.principal, call.match("key")))


@endpoint(
    "POST", "/admin/keys/{key}/revoke", summary="Revoke an API key: refused everywhere within a second.", tag="keys"
)
async def revoke_key(call: Call) -> web.StreamResponse:
    return json_response(await call.write(keys.revoke_key, call.principal, call.match("key"), call.request_id))


@endpoint(
    "POST",
    "/admin/keys/{key}/rotate",
    summary="Rotate an API key: a new key now, the old one expires after the overlap.",
    tag="keys",
    body=schemas.KeyRotate,
    status=201,
)
async def rotate_key(call: Call) -> web.StreamResponse:
    overlap = _duration(call.body.overlap, "overlap")
    rotated = await call.write(
        keys.rotate_key, call.principal, call.state.pepper, call.match("key"), overlap, call.request_id
    )
    return json_response(rotated, status=201)


# --- limits and budgets -----------------------------------------------------------------------------------


def _list_limits(connection: sa.Connection, principal: Principal, team: str | None) -> list[dict[str, Any]]:
    return limits.list_limits(connection, principal, team_id_by_name(connection, principal, team))


@endpoint(
    "GET",
    "/admin/limits",
    summary="List limit overrides (team admins: their team and its keys).",
    tag="limits",
    query=(TEAM_PARAM,),
)
async def list_limits(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(_list_limits, call.principal, call.arg("team"))})


def _limit_values(body: schemas.LimitsSet) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in body.model_fields_set - {"model"}:
        value = getattr(body, name)
        if name.endswith("_usd"):
            name = name.replace("_usd", "_nanousd")
            value = UNLIMITED if value == "unlimited" else (usd_to_nano(value) if value is not None else None)
        elif name != "budget_mode" and value == "unlimited":
            value = UNLIMITED
        values[name] = value
    if not values:
        raise InvalidRequest("nothing to set: send at least one limit field")
    return values


_SCOPE_PATH = "/admin/limits/{scope:key|user|team|team_model|model}/{subject}"


@endpoint(
    "PUT",
    _SCOPE_PATH,
    summary="Set limits of a key, user, team, team x model or model (team admins: keys of their team).",
    tag="limits",
    body=schemas.LimitsSet,
)
async def set_limits(call: Call) -> web.StreamResponse:
    body: schemas.LimitsSet = call.body
    try:
        values = _limit_values(body)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    updated = await call.write(
        limits.set_limits,
        call.principal,
        call.match("scope"),
        call.match("subject"),
        body.model or "",
        values,
        call.request_id,
    )
    return json_response(updated)


@endpoint(
    "DELETE",
    _SCOPE_PATH,
    summary="Remove a limit override: the configured defaults apply again.",
    tag="limits",
    query=(Param("model", "for the team_model scope: the model"),),
)
async def clear_limits(call: Call) -> web.StreamResponse:
    cleared = await call.write(
        limits.clear_limits,
        call.principal,
        call.match("scope"),
        call.match("subject"),
        call.arg("model") or "",
        call.request_id,
    )
    if not cleared:
        raise AdminNotFound("There is no override to remove.")
    return json_response({"deleted": True})


def _budgets(
    connection: sa.Connection, state: GatewayState, principal: Principal, team: str | None
) -> list[dict[str, Any]]:
    team_id = team_id_by_name(connection, principal, team)
    uses = budgets.budget_uses(connection, state.settings.limits, load_overrides(connection), team_id=team_id)
    return [use.as_dict() for use in uses]


@endpoint(
    "GET",
    "/admin/budgets",
    summary="Budget use this UTC day and month against the limits, per team, key and user.",
    tag="limits",
    query=(TEAM_PARAM,),
)
async def list_budgets(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(_budgets, call.state, call.principal, call.arg("team"))})


# --- prices -----------------------------------------------------------------------------------------------


@endpoint(
    "GET",
    "/admin/prices",
    summary="List effective-dated prices (USD per 1M tokens).",
    tag="prices",
    query=(Param("model", "only this model"),),
)
async def list_prices(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(prices.list_prices, call.arg("model"))})


@endpoint(
    "POST",
    "/admin/prices",
    summary="Add a price from a moment on (now or later).",
    tag="prices",
    org_only=True,
    body=schemas.PriceCreate,
    status=201,
)
async def create_price(call: Call) -> web.StreamResponse:
    body: schemas.PriceCreate = call.body
    created = await call.write(
        prices.create_price,
        call.principal,
        model=body.model,
        deployment=body.deployment,
        effective_from=body.effective_from,
        prompt=body.prompt,
        completion=body.completion,
        cached_prompt=body.cached_prompt,
        request_id=call.request_id,
    )
    return json_response(created, status=201)


# --- usage ------------------------------------------------------------------------------------------------

USAGE_PARAMS = (
    Param("from", "start, ISO date or datetime (UTC), inclusive; default: the first of this month"),
    Param("to", "end, exclusive; default: the end of today"),
    Param("group_by", "comma-separated: " + ", ".join(usage.DIMENSIONS)),
    TEAM_PARAM,
    Param("user", "a user name"),
    Param("key", "a key prefix"),
    Param("model", "a model"),
    Param("limit", "only the N largest groups by cost", type="integer"),
    Param("format", "json (default) or csv", enum=("json", "csv")),
)


def month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def usage_query(
    connection: sa.Connection, principal: Principal, args: dict[str, str | None], limit: int | None
) -> usage.UsageQuery:
    """Build the query from request arguments; names become ids, and a team admin's team is always applied."""
    now = datetime.now(UTC)
    start = usage.parse_moment(args.get("from"), default=month_start(now), param="from")
    end_default = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    end = usage.parse_moment(args.get("to"), default=end_default, param="to")
    group_by = tuple(part.strip() for part in (args.get("group_by") or "").split(",") if part.strip())
    team_id = team_id_by_name(connection, principal, args.get("team"))
    user_id = None
    if args.get("user"):
        user_id = connection.execute(sa.select(users_table.c.id).where(users_table.c.name == args["user"])).scalar()
        if user_id is None:
            raise AdminNotFound(f"User '{args['user']}' does not exist.", param="user")
    key_reference = args.get("key")
    key_id = accounts.key_id_from(key_reference) if key_reference else None
    if key_id is not None and not principal.is_org_admin:
        key_team = connection.execute(sa.select(api_keys.c.team_id).where(api_keys.c.id == key_id)).scalar()
        principal.require_team(key_team)
    return usage.UsageQuery(
        start=start,
        end=end,
        group_by=group_by,
        team_id=team_id,
        user_id=user_id,
        key_id=key_id,
        model=args.get("model"),
        limit=limit,
    )


def usage_report(
    connection: sa.Connection, principal: Principal, args: dict[str, str | None], limit: int | None
) -> dict[str, Any]:
    return usage.run_query(connection, usage_query(connection, principal, args, limit))


@endpoint(
    "GET",
    "/admin/usage",
    summary="Usage and cost over a date range, grouped (JSON or CSV). Team admins: their team only.",
    tag="usage",
    query=USAGE_PARAMS,
    produces_csv=True,
)
async def get_usage(call: Call) -> web.StreamResponse:
    args = {param.name: call.arg(param.name) for param in USAGE_PARAMS}
    limit = _int_arg(call, "limit", 0, 10_000) or None
    report = await call.read(usage_report, call.principal, args, limit)
    if args.get("format") == "csv":
        return web.Response(
            text=usage.to_csv(report),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="usage.csv"'},
        )
    return json_response(report)


# --- audit, alerts ----------------------------------------------------------------------------------------


def _audit(
    connection: sa.Connection, principal: Principal, team: str | None, limit: int, before_id: int | None
) -> list[dict[str, Any]]:
    team_id = team_id_by_name(connection, principal, team)
    return audit.list_audit(connection, team_id=team_id, limit=limit, before_id=before_id)


@endpoint(
    "GET",
    "/admin/audit",
    summary="The audit log, newest first (team admins: their team's).",
    tag="audit",
    query=(
        TEAM_PARAM,
        Param("limit", "at most this many (default 100)", type="integer"),
        Param("before_id", "page: rows older than this id", type="integer"),
    ),
)
async def list_audit(call: Call) -> web.StreamResponse:
    before = call.arg("before_id")
    if before is not None and not before.isdigit():
        raise InvalidRequest("before_id must be a number", param="before_id")
    rows = await call.read(
        _audit, call.principal, call.arg("team"), _int_arg(call, "limit", 100, 1000), int(before) if before else None
    )
    return json_response({"data": rows})


def _alerts(connection: sa.Connection, principal: Principal, team: str | None, limit: int) -> list[dict[str, Any]]:
    return alerts.list_alerts(connection, team_id=team_id_by_name(connection, principal, team), limit=limit)


@endpoint(
    "GET",
    "/admin/alerts",
    summary="Budget threshold alerts, newest first.",
    tag="alerts",
    query=(TEAM_PARAM, Param("limit", "at most this many (default 100)", type="integer")),
)
async def list_alerts(call: Call) -> web.StreamResponse:
    rows = await call.read(_alerts, call.principal, call.arg("team"), _int_arg(call, "limit", 100, 1000))
    return json_response({"data": rows})


# --- admin keys -------------------------------------------------------------------------------------------


@endpoint("GET", "/admin/admin-keys", summary="List organisation admin keys.", tag="admin keys", org_only=True)
async def list_admin_keys(call: Call) -> web.StreamResponse:
    return json_response({"data": await call.read(credentials.list_admin_keys)})


def _create_admin_key(
    connection: sa.Connection, principal: Principal, pepper: bytes, name: str | None, request_id: str
) -> dict[str, Any]:
    created = credentials.create_admin_key(connection, pepper, name)
    listed = next(row for row in credentials.list_admin_keys(connection) if row["prefix"] == created.display_prefix)
    audit.record(
        connection,
        principal,
        "admin_key.create",
        f"admin_key:{created.display_prefix}",
        team_id=None,
        after=listed,
        request_id=request_id,
    )
    return {**listed, "key": created.secret}


@endpoint(
    "POST",
    "/admin/admin-keys",
    summary="Create an organisation admin key; the secret is shown once.",
    tag="admin keys",
    org_only=True,
    body=schemas.AdminKeyCreate,
    status=201,
)
async def create_admin_key(call: Call) -> web.StreamResponse:
    created = await call.write(_create_admin_key, call.principal, call.state.pepper, call.body.name, call.request_id)
    return json_response(created, status=201)


def _revoke_admin_key(
    connection: sa.Connection, principal: Principal, reference: str, request_id: str
) -> dict[str, Any]:
    prefix = credentials.display_prefix(credentials.admin_key_id(reference))
    before = next((row for row in credentials.list_admin_keys(connection) if row["prefix"] == prefix), None)
    if before is None:
        raise AdminNotFound(f"Admin key '{reference}' does not exist.")
    if not credentials.revoke_admin_key(connection, reference):
        raise Conflict(f"Admin key '{prefix}' is already revoked.")
    after = next(row for row in credentials.list_admin_keys(connection) if row["prefix"] == prefix)
    audit.record(
        connection,
        principal,
        "admin_key.revoke",
        f"admin_key:{prefix}",
        team_id=None,
        before=before,
        after=after,
        request_id=request_id,
    )
    return after


@endpoint(
    "POST",
    "/admin/admin-keys/{key}/revoke",
    summary="Revoke an organisation admin key.",
    tag="admin keys",
    org_only=True,
)
async def revoke_admin_key(call: Call) -> web.StreamResponse:
    return json_response(await call.write(_revoke_admin_key, call.principal, call.match("key"), call.request_id))
