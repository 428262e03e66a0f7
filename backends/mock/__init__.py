"""A fast, deterministic stand-in for a vLLM OpenAI-compatible server.

Run it with ``python -m backends.mock --port 0`` (it prints
``mock backend listening on http://HOST:PORT``), or in-process with
``async with serve(config) as mock: ...``. The tokenizer functions
(:mod:`backends.mock.tokenizer`) give the exact ``usage`` it reports.
"""

from .app import STATE, RunningMock, make_app, serve
from .config import DEFAULT_MODELS, MockConfig
from .tokenizer import count_chat_prompt, count_embedding_input, count_prompt, count_text

__all__ = [
    "DEFAULT_MODELS",
    "STATE",
    "MockConfig",
    "RunningMock",
    "count_chat_prompt",
    "count_embedding_input",
    "count_prompt",
    "count_text",
    "make_app",
    "serve",
]
