"""Choosing a deployment: a pure function of the deployments' known state, so it is easy to test."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.table import DeploymentRuntime


def least_outstanding(deployments: Sequence[DeploymentRuntime], tiebreak: int) -> DeploymentRuntime:
    """The deployment with the fewest requests in flight from this process; ties rotate with `tiebreak`."""
    count = len(deployments)
    if count == 1:
        return deployments[0]
    best = deployments[tiebreak % count]
    for offset in range(1, count):
        candidate = deployments[(tiebreak + offset) % count]
        if candidate.outstanding < best.outstanding:
            best = candidate
    return best
