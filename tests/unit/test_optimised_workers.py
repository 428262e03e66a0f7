"""Workers run with -OO (gateway/serve.py): no docstrings, no asserts. What a worker serves must not depend on them."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.admin import api, deployments  # noqa: F401 - registers the endpoints
from gateway.admin.openapi import document

# Everything a worker imports, then the OpenAPI document it serves at /admin/openapi.json.
_WORKER = """
import json, sys
import gateway.app, gateway.cli, gateway.dashboard.pages
from gateway.admin import api, deployments
from gateway.admin.openapi import document
if sys.flags.optimize != 2 or document.__doc__ is not None:
    sys.exit("not running without docstrings")
print(json.dumps(document()))
"""


def test_a_worker_serves_the_same_openapi_document_without_docstrings() -> None:
    """A body model's description written as its docstring would vanish from the workers' document."""
    result = subprocess.run(
        [sys.executable, "-OO", "-c", _WORKER], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == json.loads(json.dumps(document()))
