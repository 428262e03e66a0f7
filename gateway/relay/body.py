"""What goes upstream: the client's bytes untouched, unless the gateway must change them.

Only these changes are ever made: the model name, when the deployment serves it under another name (or the
request named an alias, a group, or a model whose fallback serves it);
`stream_options.include_usage`, which the gateway always needs for metering (the usage chunk is removed again
for clients that did not ask for it); and, only where the operator opted in to clamping, `max_tokens` lowered to
what the client's limits still allow.
"""

from __future__ import annotations

import orjson

from gateway.routing.table import DeploymentRuntime
from gateway.validation import Call


def upstream_body(raw: bytes, call: Call, deployment: DeploymentRuntime, max_tokens_granted: int | None) -> bytes:
    needs_usage = call.stream and not call.include_usage
    # The name asked for may be an alias, a group or a model whose fallback serves: the upstream gets its own.
    renames = call.model != deployment.upstream_model
    if not needs_usage and not renames and max_tokens_granted is None:
        return raw
    payload = dict(call.payload)
    if renames:
        payload["model"] = deployment.upstream_model
    if max_tokens_granted is not None:
        field = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
        payload[field] = max_tokens_granted
    if needs_usage:
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
    return orjson.dumps(payload)


def rename_model_back(data: bytes, deployment: DeploymentRuntime) -> bytes:
    """Show the public model name in what the upstream sends back (cheap byte replace; names are plain)."""
    if not deployment.renames_model:
        return data
    return data.replace(
        b'"model":' + orjson.dumps(deployment.upstream_model), b'"model":' + orjson.dumps(deployment.model)
    )
