"""The framework floor: a bare aiohttp + uvloop proxy that does nothing a gateway must do.

Reads the body, POSTs it upstream on one pooled session (100 connections), and returns the bytes with the
upstream's status and content type; an event stream is relayed chunk by chunk. No auth, no parsing, no ledger.

    python bench/passthrough.py --port 8100 --upstream http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
TRUST_ENV = web.AppKey("trust_env", bool)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.post(request.app[UPSTREAM] + request.path, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/octet-stream")
        if not content_type.startswith("text/event-stream"):
            payload = await upstream.read()
            return web.Response(status=upstream.status, body=payload, headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:  # the client hung up (wrk does, mid-stream, when its time is up)
            pass
        return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100), timeout=aiohttp.ClientTimeout(30), trust_env=app[TRUST_ENV]
    )
    yield
    await app[SESSION].close()


def make_app(upstream: str, *, trust_env: bool = False) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[TRUST_ENV] = trust_env
    app.cleanup_ctx.append(_session)
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", relay)
    return app


async def serve(host: str, port: int, upstream: str, trust_env: bool) -> None:
    runner = web.AppRunner(make_app(upstream, trust_env=trust_env), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"passthrough listening on http://{host}:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL; the request path is appended")
    parser.add_argument(
        "--trust-env",
        action="store_true",
        help="ClientSession(trust_env=True): proxy env and ~/.netrc read per request in a thread (for comparison)",
    )
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream, args.trust_env))


if __name__ == "__main__":
    main()
