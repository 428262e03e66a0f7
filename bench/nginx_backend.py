"""The physical limit: Debian nginx answering canned vLLM replies, so the backend costs next to nothing.

`POST /v1/chat/completions` returns a chat completion with `usage`; `POST /stream/v1/chat/completions` returns a
whole SSE stream (20 content chunks, a finish chunk, a usage chunk, `[DONE]`) at once. Like a vLLM server, each
base URL's root (`/` and `/stream/`) answers `GET /health` and `GET /metrics` (an idle worker), which the gateway
polls for health checks and load-aware routing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from procs import BenchError, Service, free_port, require_tool

MODEL = "bench-model"
COMPLETION_ID = "chatcmpl-9f2c4e1ab37d4c0e8f5a6b7c8d9e0f12"
CREATED = 1_732_000_000
WORDS = [
    *("Packets", "arrive", "fast,", "the", "balancer", "sorts", "them", "all,", "no", "server"),
    *("falls", "down;", "steady", "queues", "hum", "on", "through", "the", "long", "night"),
]
_PIECE = 2000  # characters of canned body per nginx variable (one config parameter holds at most 4 KiB)
USAGE = {"prompt_tokens": 25, "total_tokens": 45, "completion_tokens": len(WORDS), "prompt_tokens_details": None}


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def chat_completion() -> str:
    return _compact(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "reasoning_content": None,
                        "content": " ".join(WORDS),
                        "tool_calls": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": USAGE,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def _chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
    return {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_stream() -> str:
    chunks = [_chunk({"role": "assistant", "content": ""})]
    chunks += [_chunk({"content": (" " if i else "") + word}) for i, word in enumerate(WORDS)]
    chunks.append(_chunk({}, finish_reason="stop"))
    usage_chunk = {**_chunk({}), "choices": [], "usage": USAGE}
    events = [f"data: {_compact(chunk)}\n\n" for chunk in [*chunks, usage_chunk]]
    return "".join(events) + "data: [DONE]\n\n"


def idle_metrics() -> str:
    """vLLM's Prometheus gauges and counters for an idle worker serving MODEL."""
    label = f'{{model_name="{MODEL}"}}'
    names = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    )
    return "".join(f"{name}{label} 0.0\n" for name in names)


def _nginx_string(text: str) -> str:
    """A single-quoted nginx string; `$` would start a variable in `return`, so it must not occur."""
    if "$" in text:
        raise ValueError("canned bodies must not contain '$'")
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _canned(name: str, body: str) -> tuple[str, str]:
    """`map` blocks holding `body` in pieces, and the `return` text joining them.

    nginx caps one config parameter at 4 KiB; the stream body is longer, so it travels in several variables.
    """
    pieces = [body[start : start + _PIECE] for start in range(0, len(body), _PIECE)]
    maps = "\n".join(
        f'    map "" ${name}_{index} {{ default {_nginx_string(piece)}; }}' for index, piece in enumerate(pieces)
    )
    joined = "".join(f"${{{name}_{index}}}" for index in range(len(pieces)))
    return maps, f'"{joined}"'


def nginx_config(tmp: Path, port: int) -> str:
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    chat_maps, chat_body = _canned("chat", chat_completion())
    stream_maps, stream_body = _canned("sse", chat_stream())
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {tmp / "nginx.pid"};
error_log {tmp / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    client_max_body_size 1m;
{chat_maps}
{stream_maps}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^(/stream)?/health$ {{ default_type text/plain; return 200 ''; }}
        location ~ ^(/stream)?/metrics$ {{ default_type text/plain; return 200 {_nginx_string(idle_metrics())}; }}
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 {chat_body};
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            return 200 {stream_body};
        }}
    }}
}}
"""


def start_nginx(tmp: Path) -> Service:
    nginx = require_tool("nginx", "install Debian's nginx (apt-get install nginx-light or nginx)")
    root = tmp / "nginx"
    root.mkdir()
    port = free_port()
    config = root / "nginx.conf"
    config.write_text(nginx_config(root, port))
    check = subprocess.run(
        [nginx, "-t", "-p", str(root), "-c", str(config), "-e", str(root / "error.log")],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise BenchError(f"generated nginx config is invalid:\n{check.stderr}")
    service = Service.start(
        "nginx",
        [nginx, "-p", str(root), "-c", str(config), "-e", str(root / "error.log")],
        log_path=root / "stdout.log",
        url=f"http://127.0.0.1:{port}",
    )
    service.wait_ready("/health", timeout=10)
    return service
