"""What goes upstream: the client's bytes untouched, unless the gateway must change them.

Only two changes are ever made: the model name, when the deployment serves it under another name, and
`stream_options.include_usage`, which the gateway always needs for metering (the usage chunk is removed again
for clients that did not ask for it).
"""

from __future__ import annotations

import orjson

from gateway.routing.table import DeploymentRuntime
from gateway.validation import Call


def upstream_body(raw: bytes, call: Call, deployment: DeploymentRuntime) -> bytes:
    needs_usage = call.stream and not call.include_usage
    if not needs_usage and not deployment.renames_model:
        return raw
    payload = dict(call.payload)
    if deployment.renames_model:
        payload["model"] = deployment.upstream_model
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
