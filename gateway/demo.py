"""`gateway demo`: the embedded default end to end, for a first look.

Migrates the SQLite database, starts the mock backend (unless something already answers on its port), creates a
demo team, user and key, prints ready-to-paste curl and `openai` SDK examples, and serves in the foreground.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from urllib.parse import urlsplit

from gateway import accounts
from gateway.auth.keys import load_pepper
from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.logs import configure_logging
from gateway.serve import preflight, supervise
from gateway.settings import DEFAULT_CONFIG_PATH, load_settings


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _start_mock_backend(base_url: str) -> subprocess.Popen[bytes] | None:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if _listening(host, port):
        return None
    process = subprocess.Popen(
        [sys.executable, "-m", "backends.mock", "--host", host, "--port", str(port)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    process.stdout.readline()  # "mock backend listening on ...": it is ready
    return process


def run_demo(config_path: str | None) -> int:
    settings = load_settings(config_path)
    engine = create_engine(settings.database.url)
    migrate.upgrade(engine)
    accounts.ensure_team(engine, "demo")
    accounts.ensure_user(engine, "demo")
    created = accounts.create_key(
        engine,
        load_pepper(settings.auth.pepper, settings.auth.pepper_file),
        team="demo",
        user="demo",
        name="demo",
    )
    engine.dispose()
    preflight(settings, workers=1)

    first_model = next(iter(settings.models))
    backend = _start_mock_backend(settings.models[first_model].deployments[0].static_urls[0])
    base = f"http://{settings.listen.host}:{settings.listen.port}/v1"
    print(
        f"""
Demo key (shown once): {created.secret}

  curl {base}/chat/completions \\
    -H "Authorization: Bearer {created.secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "{first_model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}", api_key="{created.secret}"); \\
print(c.chat.completions.create(model="{first_model}", messages=[{{"role": "user", "content": "Hello!"}}]))'

Usage rows land in {settings.database.url}. Stop with Ctrl-C.
""",
        flush=True,
    )
    configure_logging()
    try:
        supervise(config_path or DEFAULT_CONFIG_PATH, 1, settings, [])
    finally:
        if backend is not None:
            backend.terminate()
            backend.wait(timeout=10)
    return 0
