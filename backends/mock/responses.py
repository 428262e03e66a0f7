"""Response bodies and SSE chunks, shaped like vLLM's (field order included).

Stream chunks are the hot path of a benchmark, so each stream pre-renders the bytes
every chunk shares (id, created, model) once and only JSON-encodes the token text
per chunk (and vocabulary pieces are pre-encoded too).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from .generation import VOCAB, Reply

__all__ = [
    "DONE",
    "StreamFormat",
    "chat_body",
    "completion_body",
    "embedding_body",
    "models_body",
    "response_id",
    "usage",
]

DONE = b"data: [DONE]\n\n"
_PIECE_JSON: dict[str, bytes] = {p: orjson.dumps(p) for w in VOCAB for p in (w, " " + w)}
_FINISH = {
    None: b',"finish_reason":null}',
    "stop": b',"finish_reason":"stop","stop_reason":null}',
    "length": b',"finish_reason":"length","stop_reason":null}',
}
# Legacy completion chunks always carry stop_reason (vLLM does not exclude unset fields there).
_TEXT_FINISH = {
    None: b',"finish_reason":null,"stop_reason":null}',
    "stop": b',"finish_reason":"stop","stop_reason":null}',
    "length": b',"finish_reason":"length","stop_reason":null}',
}


def response_id(prefix: str, request: web.BaseRequest) -> str:
    """``<prefix>-<X-Request-Id>`` if the client sent one (as vLLM does), else ``<prefix>-<32 hex>``."""
    rid = request.headers.get("X-Request-Id")
    return f"{prefix}-{rid if rid else os.urandom(16).hex()}"  # = uuid4().hex's shape, cheaper


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def chat_body(rid: str, created: int, model: str, replies: Sequence[Reply], prompt_tokens: int) -> bytes:
    choices: list[dict[str, Any]] = [
        {
            "index": index,
            "message": {
                "role": "assistant",
                "content": reply.text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
        }
        for index, reply in enumerate(replies)
    ]
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(len(r.pieces) for r in replies)),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def completion_body(rid: str, created: int, model: str, replies: Sequence[Reply], prompt_tokens: int) -> bytes:
    choices = [
        {
            "index": index,
            "text": reply.text,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        for index, reply in enumerate(replies)
    ]
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(len(r.pieces) for r in replies)),
            "kv_transfer_params": None,
        }
    )


def embedding_body(
    rid: str, created: int, model: str, vectors: Sequence[list[float] | str], prompt_tokens: int
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "list",
            "created": created,
            "model": model,
            "data": [
                {"index": index, "object": "embedding", "embedding": vector} for index, vector in enumerate(vectors)
            ],
            "usage": usage(prompt_tokens, 0),
        }
    )


def models_body(models: Sequence[str], created: int, max_model_len: int) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{uuid.uuid4().hex}",
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for model in models
            ],
        }
    )


class StreamFormat:
    """The SSE events of one chat or completions stream."""

    __slots__ = ("_chat", "_head")

    def __init__(self, chat: bool, rid: str, created: int, model: str) -> None:
        self._chat = chat
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(rid),
                b',"object":"',
                obj,
                b'","created":',
                str(created).encode(),
                b',"model":',
                orjson.dumps(model),
                b',"choices":[',
            )
        )

    def _tail(self, running_usage: dict[str, Any] | None) -> bytes:
        if running_usage is None:
            return b"]}\n\n"
        return b'],"usage":' + orjson.dumps(running_usage) + b"}\n\n"

    def role_chunk(self, index: int, running_usage: dict[str, Any] | None) -> bytes:
        """Chat only: the first chunk of a choice announces the assistant role."""
        return b"".join(
            (
                self._head,
                b'{"index":',
                str(index).encode(),
                b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
                self._tail(running_usage),
            )
        )

    def token_chunk(
        self, index: int, piece: str, finish_reason: str | None, running_usage: dict[str, Any] | None
    ) -> bytes:
        text = _PIECE_JSON.get(piece) or orjson.dumps(piece)
        if self._chat:
            middle = (b'{"index":', str(index).encode(), b',"delta":{"content":', text, b'},"logprobs":null')
            finish = _FINISH[finish_reason]
        else:
            middle = (b'{"index":', str(index).encode(), b',"text":', text, b',"logprobs":null')
            finish = _TEXT_FINISH[finish_reason]
        return b"".join((self._head, *middle, finish, self._tail(running_usage)))

    def usage_chunk(self, final_usage: dict[str, Any]) -> bytes:
        """The last event before ``[DONE]`` when ``stream_options.include_usage`` is set."""
        return self._head + b'],"usage":' + orjson.dumps(final_usage) + b"}\n\n"
