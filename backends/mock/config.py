"""The mock backend's settings (the CLI flags, as one immutable object)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODELS", "MockConfig"]

DEFAULT_MODELS: tuple[str, ...] = ("mock-small", "mock-large", "mock-embed")


@dataclass(frozen=True, slots=True)
class MockConfig:
    #: Served model names; the first one answers requests that name no model (like vLLM).
    models: tuple[str, ...] = DEFAULT_MODELS
    #: Time to first token, before the first content chunk or added to a non-streaming reply.
    ttft_ms: float = 0.0
    #: Pacing of token chunks per sequence; 0 = as fast as possible (unpaced).
    tokens_per_second: float = 0.0
    embedding_dim: int = 16
    max_model_len: int = 4096
    #: Extra delay before a non-streaming reply, after the (paced) generation time.
    latency_ms: float = 0.0
    #: Requests generating at once per model; the rest wait in a FIFO (vLLM's --max-num-seqs).
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("at least one model is needed")
        if self.max_num_seqs < 1 or self.max_model_len < 1 or self.embedding_dim < 1:
            raise ValueError("max_num_seqs, max_model_len and embedding_dim must be positive")
        if self.ttft_ms < 0 or self.tokens_per_second < 0 or self.latency_ms < 0:
            raise ValueError("ttft_ms, tokens_per_second and latency_ms must not be negative")
