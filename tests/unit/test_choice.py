"""gateway.routing.choice.least_outstanding: fewest requests in flight wins; ties rotate with the tiebreak."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.choice import least_outstanding
from gateway.routing.table import DeploymentRuntime
from gateway.settings import Deployment, Timeouts


def _deployments(*outstanding: int) -> list[DeploymentRuntime]:
    return [
        DeploymentRuntime(
            config=Deployment(name=f"d{index}", base_url=f"http://127.0.0.1:{8000 + index}/v1"),
            model="m",
            timeouts=Timeouts(),
            upstream_model="m",
            outstanding=count,
        )
        for index, count in enumerate(outstanding)
    ]


def test_single_deployment() -> None:
    (only,) = _deployments(50)
    assert least_outstanding([only], 7) is only


@pytest.mark.parametrize("tiebreak", range(6))
def test_fewest_outstanding_wins_whatever_the_tiebreak(tiebreak: int) -> None:
    deployments = _deployments(5, 3, 0, 9)
    assert least_outstanding(deployments, tiebreak).name == "d2"


def test_all_equal_rotates_through_every_deployment() -> None:
    deployments = _deployments(2, 2, 2)
    picks = [least_outstanding(deployments, tiebreak).name for tiebreak in range(9)]
    assert picks == ["d0", "d1", "d2"] * 3


def test_ties_among_the_least_loaded_rotate_between_them_only() -> None:
    deployments = _deployments(1, 0, 4, 0)
    picks = Counter(least_outstanding(deployments, tiebreak).name for tiebreak in range(400))
    assert set(picks) == {"d1", "d3"}


def test_large_and_negative_tiebreaks() -> None:
    deployments = _deployments(0, 0, 0)
    assert least_outstanding(deployments, 2**63 + 1).name == f"d{(2**63 + 1) % 3}"
    assert least_outstanding(deployments, -1).name == "d2"


def test_counts_are_read_at_call_time() -> None:
    deployments = _deployments(0, 0)
    first = least_outstanding(deployments, 0)
    first.outstanding += 1
    assert least_outstanding(deployments, 0) is not first


@given(outstanding=st.lists(st.integers(0, 5), min_size=1, max_size=8), tiebreak=st.integers(0, 10_000))
def test_choice_is_always_a_minimum(outstanding: list[int], tiebreak: int) -> None:
    deployments = _deployments(*outstanding)
    assert least_outstanding(deployments, tiebreak).outstanding == min(outstanding)
