"""HTML building blocks: the page layout, tables and formatting. Every value goes through `escape`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal
from html import escape
from typing import Any

from aiohttp import web

from gateway.admin.principal import Principal

NAV = (
    ("/dashboard", "Usage"),
    ("/dashboard/budgets", "Budgets"),
    ("/dashboard/keys", "Keys"),
    ("/dashboard/alerts", "Alerts"),
)


def usd(nano: int) -> str:
    """Dollars with cents, or more digits for small amounts so they do not show as $0.00."""
    value = Decimal(nano) / 1_000_000_000
    if value == 0:
        return "$0.00"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.6f}".rstrip("0").rstrip(".") if abs(value) >= Decimal("0.000001") else f"${value:.9f}"


def number(value: float) -> str:
    value = float(value)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str = "", empty: str = "Nothing yet."
) -> str:
    head = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td class="empty" colspan="{len(columns)}">{escape(empty)}</td></tr>'
    attribute = f' id="{escape(table_id)}"' if table_id else ""
    return f'<table class="data"{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def page(
    title: str, body: str, *, principal: Principal | None, csrf: str | None = None, active: str = "", status: int = 200
) -> web.Response:
    nav = ""
    if principal is not None:
        links = "".join(
            f'<a href="{href}" class="{"active" if href == active else ""}">{escape(label)}</a>' for href, label in NAV
        )
        who = "Organisation admin" if principal.is_org_admin else f"Team admin · {principal.team_name}"
        logout = (
            f'<form method="post" action="/dashboard/logout" class="logout"><input type="hidden" name="csrf" '
            f'value="{escape(csrf or "")}"><button class="link">Sign out</button></form>'
        )
        nav = (
            f'<aside class="sidebar"><div class="brand"><span class="logo">◆</span> llm-gateway</div>'
            f'<nav>{links}</nav><div class="who"><span>{escape(who)}</span>'
            f"<small>{escape(principal.actor)}</small>{logout}</div></aside>"
        )
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · llm-gateway</title>"
        '<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>'
        f'<body class="{"app" if principal else "bare"}">{nav}<main><h1>{escape(title)}</h1>{body}</main></body></html>'
    )
    response = web.Response(text=html, content_type="text/html", status=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def notice(text: str, kind: str = "info") -> str:
    return f'<div class="notice {escape(kind)}">{text}</div>'
