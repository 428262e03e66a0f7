"""Dashboard sessions: a signed, expiring cookie that names the credential it came from (never the secret), and
a CSRF token derived from it.

The cookie is `HttpOnly; SameSite=Strict; Path=/dashboard` (Secure over https or when configured) and signed with
a key derived from the gateway's pepper, so every replica accepts it. It holds the kind and public id of the
credential used to sign in; every page load re-checks that credential in SQL, so revoking the key (or removing a
config admin key) ends its sessions at once. State-changing forms carry `csrf`, an HMAC of the session's random id:
a cross-site form cannot know it, and SameSite=Strict already keeps the cookie off cross-site requests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

COOKIE = "gw_session"
PATH = "/dashboard"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    kind: str  # admin_key | config_admin | api_key | sso
    ident: str  # admin key id, config key index, API key id, SSO identity
    expires: float
    sid: str

    def as_payload(self) -> dict[str, Any]:
        return {"v": 1, "kind": self.kind, "id": self.ident, "exp": int(self.expires), "sid": self.sid}


class SessionSigner:
    def __init__(self, pepper: bytes, lifetime_s: float) -> None:
        self._key = hmac.digest(pepper, b"gateway dashboard session v1", "sha256")
        self.lifetime_s = lifetime_s

    def new(self, kind: str, ident: str) -> Session:
        return Session(kind=kind, ident=ident, expires=time.time() + self.lifetime_s, sid=secrets.token_urlsafe(16))

    def dump(self, session: Session) -> str:
        body = _b64(orjson.dumps(session.as_payload()))
        return f"{body}.{_b64(hmac.digest(self._key, body.encode(), 'sha256'))}"

    def load(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None if it is missing, forged or expired."""
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.partition(".")
        expected = _b64(hmac.digest(self._key, body.encode(), "sha256"))
        if not hmac.compare_digest(expected, signature):
            return None
        try:
            payload = orjson.loads(_unb64(body))
            session = Session(kind=payload["kind"], ident=payload["id"], expires=payload["exp"], sid=payload["sid"])
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def csrf(self, session: Session) -> str:
        return hmac.new(self._key, b"csrf:" + session.sid.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf(session), token)
