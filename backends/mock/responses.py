"""Response bodies and SSE chunks, shaped like vLLM's (field order included).

Stream chunks are the hot path of a benchmark, so each stream pre-renders the bytes
every chunk shares (id, created, model) once and only JSON-encodes the token text
per chunk (and vocabulary pieces are pre-encoded too).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from .generation import VOCAB, Reply
from .protocol import VLLM_VERSION

__all__ = [
    "DONE",
    "StreamFormat",
    "chat_body",
    "completion_body",
    "embedding_body",
    "models_body",
    "response_id",
    "stream_usage",
    "system_fingerprint",
    "usage",
]

DONE = b"data: [DONE]\n\n"
_PIECE_JSON: dict[str, bytes] = {p: orjson.dumps(p) for w in VOCAB for p in (w, " " + w)}
# The end of a choice in a chunk. Chat: stop_reason only once the choice finishes, token_ids always.
_CHAT_FINISH = {
    None: b',"finish_reason":null,"token_ids":null}',
    "stop": b',"finish_reason":"stop","stop_reason":null,"token_ids":null}',
    "length": b',"finish_reason":"length","stop_reason":null,"token_ids":null}',
}
# Legacy completions: stop_reason, prompt_token_ids and token_ids on every chunk.
_TEXT_FINISH = {
    None: b',"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}',
    "stop": b',"finish_reason":"stop","stop_reason":null,"prompt_token_ids":null,"token_ids":null}',
    "length": b',"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}',
}


def system_fingerprint(models: Sequence[str], max_model_len: int, embedding_dim: int) -> str:
    """``vllm-<version>-<8 hex>``, like vLLM's default (``--fingerprint-mode full``, no parallelism): the
    hash covers what identifies the served models, so it changes with them and never between requests."""
    config = orjson.dumps([list(models), max_model_len, embedding_dim])
    return f"vllm-{VLLM_VERSION}-{hashlib.sha256(config).hexdigest()[:8]}"


def response_id(prefix: str, request: web.BaseRequest) -> str:
    """``<prefix>-<X-Request-Id>`` if the client sent one (as vLLM does), else ``<prefix>-<16 hex>`` (vLLM's
    ``random_uuid()``)."""
    rid = request.headers.get("X-Request-Id")
    return f"{prefix}-{rid if rid else os.urandom(8).hex()}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The ``usage`` of a whole (non-streaming) reply: every field of vLLM's ``UsageInfo``."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def stream_usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    """The ``usage`` of a stream's final usage chunk (vLLM leaves out the null details there)."""
    return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
        prompt_tokens,
        prompt_tokens + completion_tokens,
        completion_tokens,
    )


def _chat_running_usage(prompt_tokens: int, completion_tokens: int) -> bytes:
    """Chat's per-chunk usage (``continuous_usage_stats``): completion_tokens_details is set, to null."""
    return b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,"completion_tokens_details":null}' % (
        prompt_tokens,
        prompt_tokens + completion_tokens,
        completion_tokens,
    )


def chat_body(
    rid: str, created: int, model: str, replies: Sequence[Reply], prompt_tokens: int, fingerprint: str
) -> bytes:
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
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
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
            "system_fingerprint": fingerprint,
            "usage": usage(prompt_tokens, sum(len(r.pieces) for r in replies)),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def completion_body(
    rid: str, created: int, model: str, replies: Sequence[Reply], prompt_tokens: int, fingerprint: str
) -> bytes:
    choices = [
        {
            "index": index,
            "text": reply.text,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "routed_experts": None,
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
            "system_fingerprint": fingerprint,
            "usage": usage(prompt_tokens, sum(len(r.pieces) for r in replies)),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
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
                            "id": f"modelperm-{os.urandom(8).hex()}",
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
    """The SSE events of one chat or completions stream.

    ``fingerprint`` is stamped on each choice's finishing chunk when no usage chunk follows (``include_usage``
    off); otherwise the usage chunk, the last one, carries it. That is where vLLM puts it.
    """

    __slots__ = ("_chat", "_fingerprint", "_head", "_stamp")

    def __init__(self, chat: bool, rid: str, created: int, model: str, fingerprint: str, include_usage: bool) -> None:
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
        self._fingerprint = b',"system_fingerprint":' + orjson.dumps(fingerprint)
        self._stamp = b"" if include_usage else self._fingerprint

    def _running_usage(self, prompt_tokens: int | None, completion_tokens: int) -> bytes:
        if prompt_tokens is None:
            return b""
        if self._chat:
            return b',"usage":' + _chat_running_usage(prompt_tokens, completion_tokens)
        return b',"usage":' + stream_usage(prompt_tokens, completion_tokens)

    def role_chunk(self, index: int, prompt_tokens: int | None) -> bytes:
        """Chat only: the first chunk of a choice announces the assistant role. ``prompt_tokens`` (continuous
        usage only, else None) makes it carry a running usage."""
        return b"".join(
            (
                self._head,
                b'{"index":',
                str(index).encode(),
                b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]',
                self._running_usage(prompt_tokens, 0),
                b',"prompt_token_ids":null,"prompt_text":null}\n\n',
            )
        )

    def token_chunk(
        self,
        index: int,
        piece: str,
        finish_reason: str | None,
        prompt_tokens: int | None,
        completion_tokens: int,
    ) -> bytes:
        """One token of choice ``index``; with continuous usage (``prompt_tokens`` set), that choice's running
        usage: its prompt and the tokens it has generated so far."""
        text = _PIECE_JSON.get(piece) or orjson.dumps(piece)
        running = b"" if prompt_tokens is None else self._running_usage(prompt_tokens, completion_tokens)
        stamp = b"" if finish_reason is None else self._stamp
        if self._chat:
            return b'%s{"index":%d,"delta":{"content":%s},"logprobs":null%s]%s%s}\n\n' % (
                self._head,
                index,
                text,
                _CHAT_FINISH[finish_reason],
                running,
                stamp,
            )
        return b'%s{"index":%d,"text":%s,"logprobs":null%s]%s%s}\n\n' % (
            self._head,
            index,
            text,
            _TEXT_FINISH[finish_reason],
            running,
            stamp,
        )

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The last event before ``[DONE]`` when ``stream_options.include_usage`` is set."""
        return b"".join(
            (self._head, b'],"usage":', stream_usage(prompt_tokens, completion_tokens), self._fingerprint, b"}\n\n")
        )
