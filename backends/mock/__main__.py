"""CLI: ``python -m backends.mock`` (console script ``gateway-mock-backend``).

Once the listening socket is bound and listening, exactly one line goes to stdout,
``mock backend listening on http://HOST:PORT``, so a harness started with
``--port 0`` can read the chosen port.

``--workers N`` (N > 1) forks N server processes that share the port through
SO_REUSEPORT, each with its own uvloop event loop. The kernel spreads connections
over them, and everything stateful (``/mock/stats``, ``/mock/requests``, faults,
load overrides, ``/metrics``, the ``--max-num-seqs`` queue) is per process: a control
call reaches only the worker that accepts its connection. Use one worker for tests
that use the control plane, several for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web

from .app import make_app
from .config import DEFAULT_MODELS, MockConfig

__all__ = ["main", "parse_args"]

_BACKLOG = 4096
_WORKER_START_TIMEOUT_S = 60.0
_SHUTDOWN_TIMEOUT_S = 1.0  # stalled requests would otherwise hold a SIGTERM up for aiohttp's 60 s


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m backends.mock", description="A fast, deterministic mock of a vLLM OpenAI server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    parser.add_argument("--tokens-per-second", type=float, default=0.0, help="per sequence; 0 = unpaced")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests generating at once per model")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="extra delay before a non-streaming reply")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def config_from_args(args: argparse.Namespace) -> MockConfig:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    return MockConfig(
        models=models,
        ttft_ms=args.ttft_ms,
        tokens_per_second=args.tokens_per_second,
        embedding_dim=args.embedding_dim,
        max_model_len=args.max_model_len,
        latency_ms=args.latency_ms,
        max_num_seqs=args.max_num_seqs,
    )


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announce(host: str, port: int) -> None:
    sys.stdout.write(f"mock backend listening on {_url(host, port)}\n")
    sys.stdout.flush()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the stdlib loop still works, just slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(config: MockConfig, sock: socket.socket, alive: multiprocessing.connection.Connection | None = None) -> None:
    app = make_app(config)
    if alive is not None:
        app.cleanup_ctx.append(_exit_with_parent(alive))
    web.run_app(
        app,
        sock=sock,
        handler_cancellation=True,  # a client hang-up cancels its handler: that is how cancellations are seen
        print=None,
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        loop=_new_loop(),
    )


def _exit_with_parent(alive: multiprocessing.connection.Connection) -> Any:
    """A worker stops when its parent is gone (even SIGKILLed by a test harness) instead of lingering.

    Only the parent holds the other end of ``alive``; when the parent dies the pipe
    reads as EOF, which wakes the loop (no polling).
    """

    async def watch(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        fd = alive.fileno()

        def parent_gone() -> None:
            loop.remove_reader(fd)
            os.kill(os.getpid(), signal.SIGTERM)  # run_app turns SIGTERM into a graceful exit

        loop.add_reader(fd, parent_gone)
        yield
        loop.remove_reader(fd)

    return watch


def _worker(
    config: MockConfig,
    host: str,
    port: int,
    ready: multiprocessing.connection.Connection,
    alive: multiprocessing.connection.Connection,
    inherited_fds: Sequence[int],
) -> None:
    # With fork, this process got copies of the parent's port-reserving socket and of the
    # parent's end of the liveness pipe; holding them would keep the port pinned and the
    # pipe from ever reading EOF.
    for fd in inherited_fds:
        os.close(fd)
    sock = _bind(host, port, reuse_port=True)
    sock.listen(_BACKLOG)
    ready.send(os.getpid())
    ready.close()
    _serve(config, sock, alive)


def _run_workers(config: MockConfig, host: str, port: int, workers: int) -> int:
    # This socket only pins the port number (it never listens, so it gets no connections);
    # the workers bind their own listening sockets to the same port with SO_REUSEPORT.
    reserve = _bind(host, port, reuse_port=True)
    port = reserve.getsockname()[1]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx: Any = multiprocessing.get_context(method)  # typeshed's BaseContext lacks Process
    alive, alive_parent_end = ctx.Pipe(duplex=False)
    inherited = [reserve.fileno(), alive_parent_end.fileno()] if method == "fork" else []
    procs = []
    readers = []
    for index in range(workers):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(config, host, port, writer, alive, inherited),
            name=f"mock-backend-{index}",
        )
        proc.start()
        writer.close()
        procs.append(proc)
        readers.append(reader)
    alive.close()

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        for reader in readers:
            if not reader.poll(_WORKER_START_TIMEOUT_S):
                raise RuntimeError("a mock backend worker did not start")
            reader.recv()
        reserve.close()  # every worker listens now; the port stays theirs
        _announce(host, port)
        # Run until any worker exits (or we are told to stop), then stop them all.
        multiprocessing.connection.wait([p.sentinel for p in procs])
        code = next((p.exitcode or 0 for p in procs if p.exitcode is not None), 0)
    except KeyboardInterrupt:
        code = 0
    except (EOFError, RuntimeError) as exc:  # a worker died or hung while starting
        print(f"error: {exc or 'a mock backend worker failed to start'}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        reserve.close()
        alive_parent_end.close()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _run_workers(config, args.host, args.port, args.workers)
    sock = _bind(args.host, args.port, reuse_port=False)
    sock.listen(_BACKLOG)
    # The socket already accepts connections (the kernel queues them until the loop runs).
    _announce(args.host, sock.getsockname()[1])
    _serve(config, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
