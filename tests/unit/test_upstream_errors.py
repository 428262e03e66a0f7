"""gateway.upstream.errors: every upstream error shape normalised to OpenAI's, and transport failures mapped."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream.errors import error_from_upstream, translate_errors

NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def _body(error: UpstreamError) -> dict[str, object]:
    return orjson.loads(error.to_json())["error"]  # type: ignore[no-any-return]


def test_vllm_nested_shape() -> None:
    body = (
        b'{"error":{"message":"max_tokens must be at least 1, got -1.","type":"BadRequestError",'
        b'"param":null,"code":400}}'
    )
    error = error_from_upstream(400, body, NO_HEADERS, "m")
    assert error.status == 400
    assert _body(error) == {
        "message": "max_tokens must be at least 1, got -1.",
        "type": "invalid_request_error",  # Python exception names are not passed on
        "param": None,
        "code": None,  # a code that only repeats the status is dropped
    }


def test_old_vllm_flat_shape() -> None:
    body = (
        b'{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}'
    )
    error = error_from_upstream(404, body, NO_HEADERS, "x")
    assert (error.status, error.message, error.type, error.code) == (
        404,
        "The model `x` does not exist.",
        "invalid_request_error",
        None,
    )


def test_openai_shape_kept_with_param_and_code() -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": "Invalid 'messages[0].role'",
                "type": "invalid_request_error",
                "param": "messages[0].role",
                "code": "invalid_value",
            }
        }
    )
    error = error_from_upstream(400, body, NO_HEADERS, "m")
    assert (error.type, error.param, error.code) == ("invalid_request_error", "messages[0].role", "invalid_value")


def test_openai_quota_type_passes() -> None:
    body = (
        b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota",'
        b'"code":"insufficient_quota"}}'
    )
    error = error_from_upstream(429, body, NO_HEADERS, "m")
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "insufficient_quota")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"detail":"Not Found"}', "Not Found"),
        (b'{"error":"model overloaded"}', "model overloaded"),
    ],
)
def test_fastapi_detail_and_string_error(body: bytes, message: str) -> None:
    error = error_from_upstream(404, body, NO_HEADERS, "m")
    assert error.message == message
    assert error.type == "invalid_request_error"


def test_fastapi_validation_detail_list_becomes_text() -> None:
    body = b'{"detail":[{"loc":["body","model"],"msg":"field required","type":"value_error.missing"}]}'
    error = error_from_upstream(422, body, NO_HEADERS, "m")
    assert error.status == 422
    assert "field required" in error.message
    assert error.type == "invalid_request_error"


def test_plain_text_and_empty_bodies() -> None:
    error = error_from_upstream(503, b"  upstream connect error or disconnect/reset  \n", NO_HEADERS, "m")
    assert (error.status, error.type, error.message) == (
        503,
        "server_error",
        "upstream connect error or disconnect/reset",
    )
    long = error_from_upstream(500, b"x" * 5000, NO_HEADERS, "m")
    assert len(long.message) == 500
    empty = error_from_upstream(502, b"", NO_HEADERS, "m")
    assert empty.message == "The upstream serving model 'm' answered with status 502."
    html = error_from_upstream(500, b"<html><body>Internal Server Error</body></html>", NO_HEADERS, "m")
    assert "Internal Server Error" in html.message


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_a_502_for_the_client(status: int) -> None:
    body = (
        b'{"error":{"message":"Incorrect API key provided: sk-proj-****abcd","type":"invalid_request_error",'
        b'"code":"invalid_api_key"}}'
    )
    error = error_from_upstream(status, body, CIMultiDict({"Retry-After": "1"}), "gpt-4o-mini")
    assert error.status == 502
    assert error.code == "upstream_auth_failed"
    assert error.type == "server_error"
    assert "sk-proj" not in error.message  # the upstream's words about the gateway's key are not passed on
    assert "gpt-4o-mini" in error.message


def test_retry_after_headers_passed_on() -> None:
    headers = CIMultiDict({"Retry-After": "7", "retry-after-ms": "7000", "X-Request-Id": "abc"})
    error = error_from_upstream(429, b'{"error":{"message":"slow down","type":"requests"}}', headers, "m")
    assert error.status == 429
    assert error.headers == {"retry-after": "7", "retry-after-ms": "7000"}
    assert error.type == "requests"


def test_rate_limit_default_type() -> None:
    error = error_from_upstream(429, b'{"error":{"message":"slow down","type":"RateLimitError"}}', NO_HEADERS, "m")
    assert error.type == "rate_limit_exceeded"


def test_weird_codes_dropped() -> None:
    error = error_from_upstream(400, b'{"error":{"message":"x","code":{"nested":1}}}', NO_HEADERS, "m")
    assert error.code is None
    error = error_from_upstream(400, b'{"error":{"message":"x","code":true}}', NO_HEADERS, "m")
    assert error.code is None


# --- translate_errors ------------------------------------------------------------------------------------


def test_timeout_becomes_504() -> None:
    with pytest.raises(UpstreamTimeout) as info, translate_errors("m"):
        raise TimeoutError
    assert info.value.status == 504
    assert info.value.code == "upstream_timeout"
    assert isinstance(info.value.__cause__, TimeoutError)


async def test_asyncio_timeout_becomes_504() -> None:
    with pytest.raises(UpstreamTimeout), translate_errors("m"):
        async with asyncio.timeout(0):
            await asyncio.Event().wait()


def test_aiohttp_server_timeout_is_a_timeout_not_unreachable() -> None:
    with pytest.raises(UpstreamTimeout), translate_errors("m"):
        raise aiohttp.ServerTimeoutError("read timeout")


async def test_connection_refused_becomes_502_without_the_url() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: a real connection attempt is refused.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(UpstreamUnreachable) as info, translate_errors("m"):
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}"):
                pass
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    assert info.value.status == 502
    assert info.value.code == "upstream_unreachable"
    assert str(port) not in info.value.message


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), translate_errors("m"):
        raise KeyError("x")
