"""gateway.settings: environment substitution, validation messages with field paths, exact prices."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import SettingsError, load_settings, parse_settings, substitute_env

MINIMAL = """
auth:
  pepper: "0123456789abcdef0123"
models:
  m:
    deployments:
      - name: d1
        base_url: http://127.0.0.1:8001/v1
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def _raw(**top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "auth": {"pepper": "0123456789abcdef0123"},
        "models": {"m": {"deployments": [{"name": "d1", "base_url": "http://127.0.0.1:8001/v1"}]}},
    }
    raw.update(top)
    return raw


# --- substitution ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-${B}-post", {"A": "1", "B": "2"}, "pre-1-2-post"),
        ("${A:-fallback}", {}, "fallback"),
        ("${A:-fallback}", {"A": ""}, "fallback"),  # empty counts as unset, as in the shell's :-
        ("${A:-fallback}", {"A": "set"}, "set"),
        ("${A:-}", {}, ""),
        ("${URL:-http://127.0.0.1:8001/v1}", {}, "http://127.0.0.1:8001/v1"),
        ("$A and {A} and ${1A}", {"A": "x"}, "$A and {A} and ${1A}"),  # not references
    ],
)
def test_substitute_env(text: str, environ: dict[str, str], expected: str) -> None:
    assert substitute_env(text, environ) == expected


def test_unset_variable_is_an_error_naming_it() -> None:
    with pytest.raises(
        SettingsError, match=r"environment variable GATEWAY_NOPE is not set \(referenced as \$\{GATEWAY_NOPE\}\)"
    ):
        substitute_env("x ${GATEWAY_NOPE} y", {})


def test_substitution_in_nested_lists_and_after_yaml_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UT_BACKEND_2", "http://10.0.0.2:8000/v1/")
    monkeypatch.setenv("UT_PORT", "9090")
    monkeypatch.delenv("UT_UNSET_IN_COMMENT", raising=False)
    monkeypatch.delenv("UT_BACKEND_1", raising=False)
    text = """
listen:
  port: ${UT_PORT}   # ${UT_UNSET_IN_COMMENT} in a comment is inert
auth:
  pepper: "0123456789abcdef0123"
models:
  m:
    deployments:
      - name: d1
        base_url: ${UT_BACKEND_1:-http://10.0.0.1:8000/v1}
      - name: d2
        base_url: ${UT_BACKEND_2}
        served_model: "a: b # ${UT_PORT}"
"""
    settings = load_settings(_write(tmp_path, text))
    assert settings.listen.port == 9090
    urls = [d.base_url for d in settings.models["m"].deployments]
    assert urls == ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]  # trailing slash stripped
    assert settings.models["m"].deployments[1].served_model == "a: b # 9090"


def test_unset_variable_in_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UT_MISSING_PEPPER", raising=False)
    path = _write(tmp_path, MINIMAL.replace('"0123456789abcdef0123"', "${UT_MISSING_PEPPER}"))
    with pytest.raises(SettingsError, match="UT_MISSING_PEPPER is not set"):
        load_settings(path)


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(_write(tmp_path, MINIMAL)))
    assert list(load_settings().models) == ["m"]


# --- validation ------------------------------------------------------------------------------------------


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(SettingsError) as info:
        parse_settings(raw)
    return str(info.value)


def test_error_names_the_dotted_field_path() -> None:
    raw = _raw(models={"m": {"deployments": [{"name": "d1", "base_url": "ftp://x"}]}})
    message = _error(raw)
    assert message.startswith("invalid configuration:")
    assert "models.m.deployments.0.base_url: String should match pattern" in message


def test_errors_list_every_problem() -> None:
    message = _error(_raw(listen={"port": 70000, "hots": "x"}, server={"workers": 0}))
    assert "listen.port:" in message
    assert "listen.hots: Extra inputs are not permitted" in message
    assert "server.workers:" in message


def test_prompt_estimate_choices() -> None:
    assert parse_settings(_raw()).limits.prompt_estimate == "cl100k-32k"
    for choice in ("cl100k", "bytes"):
        assert parse_settings(_raw(limits={"prompt_estimate": choice})).limits.prompt_estimate == choice
    assert "limits.prompt_estimate: Input should be 'cl100k-32k', 'cl100k' or 'bytes'" in _error(
        _raw(limits={"prompt_estimate": "words"})
    )


def test_missing_sections() -> None:
    message = _error({"models": {}})
    assert "auth: Field required" in message
    assert "models: Dictionary should have at least 1 item" in message


@pytest.mark.parametrize(
    ("auth", "fragment"),
    [({}, "set auth.pepper"), ({"pepper": "short"}, "at least 16 characters"), ({"pepper": ""}, "set auth.pepper")],
)
def test_pepper_rules(auth: dict[str, Any], fragment: str) -> None:
    assert fragment in _error(_raw(auth=auth))


def test_duplicate_deployment_names_rejected() -> None:
    models = {
        "a": {"deployments": [{"name": "gpu", "base_url": "http://x"}]},
        "b": {"deployments": [{"name": "gpu", "base_url": "http://y"}]},
    }
    assert "models.b: deployment name 'gpu' is used twice" in _error(_raw(models=models))


@pytest.mark.parametrize("url", ["", None])
def test_empty_redis_url_is_none(url: str | None) -> None:
    assert parse_settings(_raw(redis={"url": url})).redis.url is None


def test_empty_redis_url_from_environment_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UT_REDIS_URL", raising=False)
    settings = load_settings(_write(tmp_path, MINIMAL + 'redis:\n  url: "${UT_REDIS_URL:-}"\n'))
    assert settings.redis.url is None


# --- prices ----------------------------------------------------------------------------------------------


def test_yaml_float_prices_stay_exact_decimals(tmp_path: Path) -> None:
    text = MINIMAL.replace("  m:\n", "  m:\n    price: {prompt: 0.15, completion: 0.6, cached_prompt: 0.000000001}\n")
    price = load_settings(_write(tmp_path, text)).models["m"].price
    assert price is not None
    assert isinstance(price.prompt, Decimal)
    assert price.prompt == Decimal("0.15")
    assert str(price.prompt) == "0.15"  # not 0.1499999999999999944488848768742172978818416595458984375
    assert price.completion == Decimal("0.6")
    assert price.cached_prompt == Decimal("0.000000001")


def test_integer_and_string_prices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("UT_PROMPT_PRICE", raising=False)
    text = MINIMAL.replace("  m:\n", '  m:\n    price: {prompt: "${UT_PROMPT_PRICE:-0.15}", completion: 10}\n')
    price = load_settings(_write(tmp_path, text)).models["m"].price
    assert price is not None
    assert (price.prompt, price.completion, price.cached_prompt) == (Decimal("0.15"), Decimal(10), None)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0.0000000001, "models.m.price.prompt:"),  # finer than one nano-USD per M tokens
        (-1, "models.m.price.prompt:"),
        ("abc", "models.m.price.prompt:"),
    ],
)
def test_bad_prices_name_the_field(value: object, fragment: str) -> None:
    models = {
        "m": {"price": {"prompt": value, "completion": 1}, "deployments": [{"name": "d", "base_url": "http://x"}]}
    }
    assert fragment in _error(_raw(models=models))


# --- loading ---------------------------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read configuration file"):
        load_settings(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is not valid YAML"):
        load_settings(_write(tmp_path, "models: [unclosed\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="the top level must be a mapping"):
        load_settings(_write(tmp_path, "- a\n- b\n"))
