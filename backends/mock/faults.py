"""Injected faults: the control plane sets a list, inference requests consume it in order.

A fault applies to ``times`` requests (``None`` = every request) and optionally only to
one ``model``. For each inference request the first fault that matches and still has
uses left is taken, so a list like ``[error x2, slow forever]`` fails two requests and
then slows down the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

__all__ = ["MODES", "Fault", "FaultList", "FaultMode"]

FaultMode = Literal["error", "stall", "stall_after", "drop_after", "slow"]
MODES: frozenset[str] = frozenset({"error", "stall", "stall_after", "drop_after", "slow"})


@dataclass(slots=True)
class Fault:
    mode: FaultMode
    #: ``error``: the HTTP status, an optional body replacing vLLM's error body, and extra headers.
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: How many more requests this fault applies to; ``None`` = forever.
    times: int | None = None
    #: Only requests for this model; ``None`` = all models.
    model: str | None = None
    #: ``stall_after`` / ``drop_after``: token chunks streamed before hanging / aborting.
    after_tokens: int = 0
    #: ``slow``: pacing overrides (``None`` keeps the server's setting).
    ttft_ms: float | None = None
    tokens_per_second: float | None = None

    @classmethod
    def from_json(cls, raw: Any) -> Fault:
        """Parse one fault object; raises ``ValueError`` with a message fit for a 400 reply."""
        if not isinstance(raw, dict):
            raise ValueError("each fault must be an object")
        mode = raw.get("mode")
        if mode not in MODES:
            raise ValueError(f"fault mode must be one of {sorted(MODES)}, got {mode!r}")
        fault = cls(mode=cast(FaultMode, mode))
        status = raw.get("status", 500)
        if not _is_int(status) or not 100 <= status <= 599:
            raise ValueError("fault status must be an HTTP status code")
        fault.status = status
        fault.body = raw.get("body")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str | int | float) for v in headers.values()):
            raise ValueError("fault headers must be an object of strings")
        fault.headers = {str(k): str(v) for k, v in headers.items()}
        times = raw.get("times")
        if times is not None and (not _is_int(times) or times < 0):
            raise ValueError("fault times must be a non-negative integer or null")
        fault.times = times
        model = raw.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError("fault model must be a string or null")
        fault.model = model
        after = raw.get("after_tokens", 0)
        if not _is_int(after) or after < 0:
            raise ValueError("fault after_tokens must be a non-negative integer")
        fault.after_tokens = after
        for key in ("ttft_ms", "tokens_per_second"):
            value = raw.get(key)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"fault {key} must be a non-negative number or null")
            setattr(fault, key, None if value is None else float(value))
        return fault

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FaultList:
    """The active faults, in order."""

    __slots__ = ("_faults",)

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def replace(self, raw: Any) -> None:
        """Replace the list from a control-plane body ``{"faults": [...]}`` (all or nothing)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("faults"), list):
            raise ValueError('body must be {"faults": [...]}')
        self._faults = [Fault.from_json(item) for item in raw["faults"]]

    def clear(self) -> None:
        self._faults = []

    def take(self, model: str) -> Fault | None:
        """The fault for one request to ``model``, consuming one use of it; ``None`` if none applies."""
        if not self._faults:  # the common case: no faults, no work
            return None
        for fault in self._faults:
            if fault.model is not None and fault.model != model:
                continue
            if fault.times is None:
                return fault
            if fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [fault.to_json() for fault in self._faults]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
