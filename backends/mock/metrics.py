"""``/metrics``: Prometheus text with vLLM's metric names and ``model_name`` label.

Rendered by hand rather than through ``prometheus_client``: a handful of lines per
model, no global registry shared between in-process test servers, and the gateway
scrapes it often.
"""

from __future__ import annotations

from .state import FINISH_REASONS, Engine, LoadOverride, MockState

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)
_COUNTERS = (
    ("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens."),
    ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens."),
    ("vllm:prompt_tokens_total", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "Number of generation tokens processed."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _gauges(engine: Engine, override: LoadOverride | None) -> tuple[float, float, float]:
    running = float(engine.running)
    waiting = float(engine.waiting)
    kv = min(1.0, engine.running / engine.max_num_seqs)
    if override is not None:
        if override.running is not None:
            running = float(override.running)
        if override.waiting is not None:
            waiting = float(override.waiting)
        if override.kv_cache_usage_perc is not None:
            kv = override.kv_cache_usage_perc
    return running, waiting, kv


def render_metrics(state: MockState) -> str:
    engines = list(state.engines.values())
    labels = {engine.name: f'model_name="{_label(engine.name)}"' for engine in engines}
    default_override = state.load.get(None)
    gauges = {e.name: _gauges(e, state.load.get(e.name, default_override)) for e in engines}
    lines: list[str] = []
    for position, (name, help_text) in enumerate(_GAUGES):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{labels[e.name]}}} {gauges[e.name][position]!r}" for e in engines]
    for name, help_text in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for e in engines:
            value = {
                "vllm:prefix_cache_queries_total": e.prefix_queries,
                "vllm:prefix_cache_hits_total": e.prefix_hits,
                "vllm:prompt_tokens_total": e.prompt_tokens,
                "vllm:generation_tokens_total": e.generation_tokens,
            }[name]
            lines.append(f"{name}{{{labels[e.name]}}} {float(value)!r}")
    name = "vllm:request_success_total"
    lines += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
    for e in engines:
        for reason in FINISH_REASONS:
            lines.append(f'{name}{{finished_reason="{reason}",{labels[e.name]}}} {float(e.finished[reason])!r}')
    lines.append("")
    return "\n".join(lines)
