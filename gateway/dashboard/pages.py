"""The dashboard's pages: usage (charts, totals, top consumers, CSV), budgets (bars against limits), keys (create,
revoke) and alerts. Server-rendered; every number comes from the same functions as the admin API, and every change
goes through the same operations (with their audit rows)."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from html import escape
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from gateway import accounts, alerts
from gateway.admin import api, budgets, keys
from gateway.admin.errors import AdminNotFound
from gateway.admin.principal import Principal
from gateway.admin.routing import _write
from gateway.admin.usage import to_csv
from gateway.context import REQUEST_ID
from gateway.dashboard import auth
from gateway.dashboard.charts import Series, meter, stacked_bars
from gateway.dashboard.render import hidden, notice, number, page, table, usd
from gateway.dashboard.session import COOKIE, PATH, Session
from gateway.db.schema import teams as teams_table
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest
from gateway.limits.policy import load_overrides
from gateway.state import STATE

RANGES = {"7d": 7, "30d": 30, "90d": 90}
GROUPS = ("team", "user", "key", "model")
TOP_SERIES = 7


class Viewer:
    """The signed-in principal of one page view, its session and CSRF token."""

    def __init__(self, request: web.Request, principal: Principal, session: Session, fresh: bool) -> None:
        self.request = request
        self.principal = principal
        self.session = session
        self.fresh = fresh
        self.csrf = request.app[auth.SIGNER].csrf(session)

    def finish(self, response: web.StreamResponse) -> web.StreamResponse:
        if self.fresh:
            auth.set_cookie(response, self.request, self.request.app[auth.SIGNER], self.session)
        return response

    def page(self, title: str, body: str, *, active: str, status: int = 200) -> web.StreamResponse:
        return self.finish(page(title, body, principal=self.principal, csrf=self.csrf, active=active, status=status))


async def viewer(request: web.Request) -> Viewer:
    found = await auth.current(request)
    if found is None:
        raise web.HTTPFound(f"{PATH}/login")
    return Viewer(request, *found)


async def checked_form(request: web.Request) -> tuple[Viewer, Any]:
    """A state-changing form post: signed in, and carrying the session's CSRF token."""
    who = await viewer(request)
    form = await request.post()
    if not request.app[auth.SIGNER].check_csrf(who.session, form.get("csrf")):  # type: ignore[arg-type]
        raise web.HTTPForbidden(text="The form has expired or did not come from this dashboard. Reload and retry.")
    return who, form


async def _write_op(request: web.Request, func: Any, *args: Any, **kwargs: Any) -> Any:
    state = request.app[STATE]
    return await state.sql.run(functools.partial(_write, state.sql.engine, func, *args, **kwargs))


# --- sign-in -----------------------------------------------------------------------------------------------


def _login_page(message: str = "", status: int = 200) -> web.Response:
    error = notice(escape(message), "error") if message else ""
    body = (
        f'<div class="login-box"><div class="brand"><span class="logo">◆</span> llm-gateway</div>{error}'
        '<form method="post" action="/dashboard/login" class="stack" id="login">'
        '<label>Admin key or team admin API key<input type="password" name="key" autocomplete="off" required '
        'autofocus placeholder="sk-gwadm-… or sk-gw-…"></label><button type="submit">Sign in</button></form>'
        '<p class="muted">The key is exchanged for a session cookie and never stored in the browser.</p></div>'
    )
    return page("Sign in", body, principal=None, status=status)


async def login_form(request: web.Request) -> web.StreamResponse:
    if await auth.current(request) is not None:
        raise web.HTTPFound(PATH)
    return _login_page()


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    raw = str(form.get("key") or "").strip()
    try:
        _principal, session = await auth.sign_in(request, raw)
    except AuthenticationFailed:
        return _login_page("That key is not valid.", status=401)
    except GatewayError as exc:  # Forbidden: a valid API key without the team admin flag
        return _login_page(exc.message, status=exc.status)
    response = web.HTTPFound(PATH)
    auth.set_cookie(response, request, request.app[auth.SIGNER], session)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    await checked_form(request)
    response = web.HTTPFound(f"{PATH}/login")
    response.del_cookie(COOKIE, path=PATH)
    raise response


# --- usage -------------------------------------------------------------------------------------------------


def _usage_args(request: web.Request, principal: Principal) -> tuple[dict[str, str | None], list[date], str]:
    days = RANGES.get(request.query.get("range", "7d"), 7)
    group = request.query.get("group") or ("team" if principal.is_org_admin else "key")
    if group not in GROUPS:
        raise InvalidRequest(f"group is one of {', '.join(GROUPS)}", param="group")
    today = datetime.now(UTC).date()
    labels = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    args: dict[str, str | None] = {
        "from": labels[0].isoformat(),
        "to": (today + timedelta(days=1)).isoformat(),
        "group_by": f"day,{group}",
        "team": request.query.get("team") or None,
    }
    return args, labels, group


def _series(rows: list[dict[str, Any]], group: str, labels: list[str], metric: str) -> list[Series]:
    totals: dict[str, int] = defaultdict(int)
    by_day: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        name = str(row[group] or "(none)")
        totals[name] += row[metric]
        by_day[(name, row["day"])] += row[metric]
    ranked = sorted(totals, key=lambda name: -totals[name])
    shown, rest = ranked[:TOP_SERIES], ranked[TOP_SERIES:]
    series = [Series(name, [float(by_day[(name, label)]) for label in labels]) for name in shown]
    if rest:
        series.append(Series("other", [float(sum(by_day[(name, label)] for name in rest)) for label in labels]))
    return series


def _filters(request: web.Request, principal: Principal, team_names: list[str], group: str) -> str:
    current_range = request.query.get("range", "7d")
    ranges = "".join(
        f'<option value="{key}"{" selected" if key == current_range else ""}>Last {days} days</option>'
        for key, days in RANGES.items()
    )
    groups = "".join(
        f'<option value="{name}"{" selected" if name == group else ""}>{name.title()}</option>' for name in GROUPS
    )
    team_select = ""
    if principal.is_org_admin:
        chosen = request.query.get("team", "")
        options = '<option value="">All teams</option>' + "".join(
            f'<option value="{escape(name)}"{" selected" if name == chosen else ""}>{escape(name)}</option>'
            for name in team_names
        )
        team_select = f'<label>Team<select name="team">{options}</select></label>'
    csv_query = "&".join(f"{key}={escape(value)}" for key, value in request.query.items())
    return (
        f'<form class="filters" method="get" action="/dashboard" id="filters">'
        f'<label>Range<select name="range">{ranges}</select></label>'
        f'<label>Group by<select name="group">{groups}</select></label>{team_select}'
        f'<button type="submit" class="secondary">Apply</button>'
        f'<a class="button secondary" id="csv" href="/dashboard/usage.csv?{csv_query}">Export CSV</a></form>'
    )


def _team_names(connection: sa.Connection, principal: Principal) -> list[str]:
    if not principal.is_org_admin:
        return [principal.team_name or ""]
    return list(connection.execute(sa.select(teams_table.c.name).order_by(teams_table.c.name)).scalars())


def _overview_data(
    connection: sa.Connection, principal: Principal, args: dict[str, str | None], state: Any
) -> dict[str, Any]:
    report = api.usage_report(connection, principal, args, None)
    team_id = api.team_id_by_name(connection, principal, args.get("team"))
    uses = budgets.budget_uses(connection, state.settings.limits, load_overrides(connection), team_id=team_id)
    return {
        "report": report,
        "budgets": sorted(uses, key=lambda use: -use.percent)[:5],
        "teams": _team_names(connection, principal),
        "alerts": alerts.list_alerts(connection, team_id=team_id, limit=5),
    }


async def overview(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    args, days, group = _usage_args(request, who.principal)
    data = await auth.run_read(request, _overview_data, who.principal, args, request.app[STATE])
    rows = data["report"]["rows"]
    labels = [day.isoformat() for day in days]
    cost = sum(row["cost_nanousd"] for row in rows)
    tokens = sum(row["total_tokens"] for row in rows)
    requests = sum(row["requests"] for row in rows)
    errors = sum(row["errors"] for row in rows)
    cards = (
        '<div class="cards" id="totals">'
        f'<div class="card"><div class="label">Spend</div><div class="value" id="total-cost" '
        f'data-nanousd="{cost}">{usd(cost)}</div></div>'
        f'<div class="card"><div class="label">Tokens</div><div class="value" id="total-tokens" '
        f'data-tokens="{tokens}">{number(tokens)}</div></div>'
        f'<div class="card"><div class="label">Requests</div><div class="value" id="total-requests" '
        f'data-requests="{requests}">{number(requests)}</div></div>'
        f'<div class="card"><div class="label">Errors</div><div class="value" id="total-errors">{number(errors)}</div>'
        "</div></div>"
    )
    charts = (
        '<div class="grid2">'
        '<section class="panel">'
        + stacked_bars(
            labels,
            _series(rows, group, labels, "cost_nanousd"),
            title=f"Spend per day by {group}",
            fmt=usd_axis,
            chart_id="spend-chart",
        )
        + '</section><section class="panel">'
        + stacked_bars(
            labels,
            _series(rows, group, labels, "total_tokens"),
            title=f"Tokens per day by {group}",
            fmt=number,
            chart_id="tokens-chart",
        )
        + "</section></div>"
    )
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        for metric in ("requests", "prompt_tokens", "completion_tokens", "cost_nanousd"):
            totals[str(row[group] or "(none)")][metric] += row[metric]
    ranked = sorted(totals.items(), key=lambda item: -item[1]["cost_nanousd"])
    top = table(
        [group.title(), "Requests", "Prompt tokens", "Completion tokens", "Spend"],
        [
            (
                f'<span class="mono">{escape(name)}</span>',
                number(value["requests"]),
                number(value["prompt_tokens"]),
                number(value["completion_tokens"]),
                usd(value["cost_nanousd"]),
            )
            for name, value in ranked[:15]
        ],
        table_id="top-consumers",
        empty="No usage in this range.",
    )
    budget_bars = "".join(_meter(use) for use in data["budgets"]) or '<p class="muted">No budgets are set.</p>'
    body = (
        _filters(request, who.principal, data["teams"], group)
        + cards
        + charts
        + '<div class="grid2"><section class="panel"><h2>Top consumers</h2>'
        + top
        + "</section>"
        + '<section class="panel"><h2>Budgets</h2>'
        + budget_bars
        + '<p><a href="/dashboard/budgets">All budgets →</a></p>'
        + "<h2>Recent alerts</h2>"
        + _alerts_table(data["alerts"])
        + "</section></div>"
    )
    return who.page("Usage", body, active="/dashboard")


def usd_axis(nano: float) -> str:
    return usd(int(nano))


async def usage_csv(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    args, _days, _group = _usage_args(request, who.principal)
    report = await auth.run_read(request, api.usage_report, who.principal, args, None)
    response = web.Response(text=to_csv(report), content_type="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="usage.csv"'
    return who.finish(response)


# --- budgets -----------------------------------------------------------------------------------------------


def _meter(use: budgets.BudgetUse) -> str:
    is_cost = use.metric.endswith("cost")
    detail = f"{usd(use.used)} of {usd(use.limit)}" if is_cost else f"{number(use.used)} of {number(use.limit)} tokens"
    label = f"{use.scope} {use.subject} · {use.metric.replace('_', ' ')}"
    return meter(use.used, use.limit, label=label, detail=detail)


def _budget_data(connection: sa.Connection, principal: Principal, state: Any) -> list[budgets.BudgetUse]:
    team_id = principal.team_filter(None)
    return budgets.budget_uses(connection, state.settings.limits, load_overrides(connection), team_id=team_id)


async def budgets_page(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    uses = await auth.run_read(request, _budget_data, who.principal, request.app[STATE])
    sections = []
    for scope in ("team", "user", "key"):
        chosen = [use for use in uses if use.scope == scope]
        if chosen:
            bars = "".join(_meter(use) for use in sorted(chosen, key=lambda use: -use.percent))
            sections.append(
                f'<section class="panel" id="budgets-{scope}"><h2>{scope.title()} budgets</h2>{bars}</section>'
            )
    body = "".join(sections) or notice("No budgets are set. Set them with the admin API or `gateway limits set`.")
    body = '<p class="muted">This UTC day and month, from the usage ledger; the mark is at 80 %.</p>' + body
    return who.page("Budgets", body, active="/dashboard/budgets")


# --- keys --------------------------------------------------------------------------------------------------


def _keys_data(connection: sa.Connection, principal: Principal, team: str | None) -> dict[str, Any]:
    team_id = api.team_id_by_name(connection, principal, team)
    return {"keys": keys.list_keys(connection, principal, team_id), "teams": _team_names(connection, principal)}


def _key_rows(who: Viewer, listed: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for key in listed:
        action = ""
        if key["state"] == "active":
            action = (
                f'<form method="post" action="/dashboard/keys/{escape(key["prefix"])}/revoke" class="inline">'
                f'{hidden("csrf", who.csrf)}<button class="danger" data-prefix="{escape(key["prefix"])}">Revoke'
                "</button></form>"
            )
        rows.append(
            (
                f'<span class="mono">{escape(key["prefix"])}</span>',
                escape(key["name"] or ""),
                escape(key["team"]),
                escape(key["user"] or "—"),
                escape(", ".join(key["models"] or []) or "all"),
                key["created_at"].strftime("%Y-%m-%d"),
                key["last_used_at"].strftime("%Y-%m-%d %H:%M") if key["last_used_at"] else "never",
                f'<span class="pill {escape(key["state"].split()[0])}">{escape(key["state"])}</span>',
                action,
            )
        )
    return rows


async def keys_page(request: web.Request, message: str = "", status: int = 200) -> web.StreamResponse:
    who = await viewer(request)
    data = await auth.run_read(request, _keys_data, who.principal, request.query.get("team") or None)
    team_field = (
        '<label>Team<select name="team">'
        + "".join(f'<option value="{escape(name)}">{escape(name)}</option>' for name in data["teams"])
        + "</select></label>"
        if who.principal.is_org_admin
        else ""
    )
    create = (
        '<section class="panel"><h2>Create a key</h2><form method="post" action="/dashboard/keys" class="row" '
        f'id="create-key">{hidden("csrf", who.csrf)}{team_field}'
        '<label>Name<input name="name" maxlength="128" placeholder="e.g. ci"></label>'
        '<label>User (optional)<input name="user" maxlength="128"></label>'
        '<label>Models (comma-separated)<input name="models" placeholder="all"></label>'
        '<label>Expires in<input name="expires_in" placeholder="e.g. 30d"></label>'
        '<button type="submit">Create key</button></form></section>'
    )
    listing = table(
        ["Prefix", "Name", "Team", "User", "Models", "Created", "Last used", "State", ""],
        _key_rows(who, data["keys"]),
        table_id="keys",
        empty="No keys yet.",
    )
    body = message + create + f'<section class="panel"><h2>Keys</h2>{listing}</section>'
    return who.page("Keys", body, active="/dashboard/keys", status=status)


async def create_key(request: web.Request) -> web.StreamResponse:
    who, form = await checked_form(request)
    models = [item.strip() for item in str(form.get("models") or "").split(",") if item.strip()] or None
    expires = str(form.get("expires_in") or "").strip()
    try:
        created = await _write_op(
            request,
            keys.create_key,
            who.principal,
            request.app[STATE].pepper,
            team=str(form.get("team") or "") or None,
            user=str(form.get("user") or "").strip() or None,
            models=models,
            expires_in=accounts.parse_duration(expires) if expires else None,
            name=str(form.get("name") or "").strip() or None,
            tags=None,
            team_admin=False,
            request_id=str(request[REQUEST_ID]),
        )
    except (GatewayError, accounts.AccountError) as exc:
        return await keys_page(request, notice(escape(str(exc)), "error"), status=getattr(exc, "status", 400))
    shown = notice(
        f"Key <b>{escape(created['prefix'])}</b> created. Copy it now: it is shown only this once."
        f'<code id="new-key">{escape(created["key"])}</code>',
        "secret",
    )
    return await keys_page(request, shown, status=201)


async def revoke_key(request: web.Request) -> web.StreamResponse:
    who, _form = await checked_form(request)
    prefix = request.match_info["prefix"]
    try:
        await _write_op(request, keys.revoke_key, who.principal, prefix, str(request[REQUEST_ID]))
    except GatewayError as exc:
        return await keys_page(request, notice(escape(exc.message), "error"), status=exc.status)
    raise web.HTTPSeeOther(f"{PATH}/keys")


# --- alerts ------------------------------------------------------------------------------------------------


def _alerts_table(rows: list[dict[str, Any]]) -> str:
    def amount(row: dict[str, Any], field: str) -> str:
        return usd(row[field]) if row["unit"] == "nanousd" else f"{number(row[field])} tokens"

    return table(
        ["When", "Team", "Scope", "Budget", "Threshold", "Used", "Webhook"],
        [
            (
                escape((row["created_at"] or "")[:16].replace("T", " ")),
                escape(row["team"] or "—"),
                escape(f"{row['scope']}"),
                escape(f"{row['metric'].replace('_', ' ')} ({row['period']})"),
                f"{row['threshold_percent']} %",
                f"{amount(row, 'used')} of {amount(row, 'limit')}",
                f'<span class="pill {escape(row["status"])}">{escape(row["status"])}</span>',
            )
            for row in rows
        ],
        table_id="alerts",
        empty="No budget alerts.",
    )


async def alerts_page(request: web.Request) -> web.StreamResponse:
    who = await viewer(request)
    rows = await auth.run_read(request, _alerts_data, who.principal)
    return who.page("Alerts", f'<section class="panel">{_alerts_table(rows)}</section>', active="/dashboard/alerts")


def _alerts_data(connection: sa.Connection, principal: Principal) -> list[dict[str, Any]]:
    return alerts.list_alerts(connection, team_id=principal.team_filter(None), limit=200)


# --- errors as pages ---------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def html_errors(handler: Handler) -> Handler:
    """Show a gateway error (403, 404, 400) as a page rather than JSON: a person is reading it."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (AdminNotFound, GatewayError) as exc:
            if isinstance(exc, AuthenticationFailed):
                raise web.HTTPFound(f"{PATH}/login") from None
            found = await auth.current(request)
            principal = found[0] if found else None
            body = notice(escape(exc.message), "error") + '<p><a href="/dashboard">Back to the dashboard</a></p>'
            return page("Not possible", body, principal=principal, status=exc.status)

    return wrapped
