"""The billing dashboard at `/dashboard`: server-rendered pages, one stylesheet, inline SVG charts; nothing is
loaded from outside the gateway, so it works offline. Sign-in exchanges an admin or team admin key for a session
cookie (see `session`), or trusts an SSO proxy's identity header when configured (see `auth`)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.state import GatewayState

STATIC = Path(__file__).parent / "static"


def setup(app: web.Application, state: GatewayState) -> None:
    from gateway.dashboard import pages
    from gateway.dashboard.auth import SIGNER
    from gateway.dashboard.session import SessionSigner

    app[SIGNER] = SessionSigner(state.pepper, state.settings.dashboard.session_hours * 3600)
    wrap = pages.html_errors
    app.router.add_get("/dashboard", wrap(pages.overview))
    app.router.add_get("/dashboard/login", pages.login_form)
    app.router.add_post("/dashboard/login", pages.login)
    app.router.add_post("/dashboard/logout", pages.logout)
    app.router.add_get("/dashboard/usage.csv", wrap(pages.usage_csv))
    app.router.add_get("/dashboard/budgets", wrap(pages.budgets_page))
    app.router.add_get("/dashboard/keys", wrap(pages.keys_page))
    app.router.add_post("/dashboard/keys", wrap(pages.create_key))
    app.router.add_post("/dashboard/keys/{prefix}/revoke", wrap(pages.revoke_key))
    app.router.add_get("/dashboard/alerts", wrap(pages.alerts_page))
    app.router.add_static("/dashboard/static", STATIC, append_version=False)
