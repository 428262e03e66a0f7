"""gateway.auth.keys and gateway.auth.store: key format, HMAC checks, authentication outcomes, the pepper file."""

from __future__ import annotations

import math
import stat
import string
import time
from pathlib import Path

import pytest

from gateway.auth import keys
from gateway.auth.store import KeyRecord, authenticate, authorize_model, bearer_token
from gateway.errors import AuthenticationFailed, ModelNotAllowed

PEPPER = b"pepper-for-unit-tests-0123456789"
ALPHABET = set(string.ascii_letters + string.digits)


def test_generated_key_format() -> None:
    new = keys.generate()
    assert len(new.secret) == keys.KEY_LENGTH == 51
    assert new.secret.startswith("sk-gw-" + new.key_id + "-")
    assert len(new.key_id) == 12
    secret_part = new.secret.rsplit("-", 1)[1]
    assert len(secret_part) == 32
    assert set(new.key_id) <= ALPHABET
    assert set(secret_part) <= ALPHABET
    assert new.display_prefix == "sk-gw-" + new.key_id
    assert keys.parse_key_id(new.secret) == new.key_id


def test_secret_strength() -> None:
    assert keys.SECRET_LENGTH * math.log2(len(ALPHABET)) >= 128
    generated = [keys.generate() for _ in range(2000)]
    assert len({new.secret for new in generated}) == 2000
    assert len({new.key_id for new in generated}) == 2000
    # Every alphabet character shows up in 2000 * 32 draws: the secret really uses all 62 symbols.
    assert set("".join(new.secret.rsplit("-", 1)[1] for new in generated)) == ALPHABET


GOOD = "sk-gw-AbCdEf012345-" + "x" * 32


@pytest.mark.parametrize(
    "raw",
    [
        "",
        GOOD[:-1],  # too short
        GOOD + "y",  # too long
        "sk-xx-AbCdEf012345-" + "x" * 32,  # wrong prefix
        "sk-gw-AbCdEf012345_" + "x" * 32,  # no dash after the id
        "sk-gw-AbCdEf01234_-" + "x" * 32,  # id outside the alphabet
        "sk-gw-AbCdEf01234é-" + "x" * 32,  # non-ASCII id character (same length in characters)
        "sk-gw-AbCdEf01234 -" + "x" * 32,
        "Bearer sk-gw-AbCdEf012345-" + "x" * 25,
    ],
)
def test_parse_key_id_malformed(raw: str) -> None:
    assert keys.parse_key_id(raw) is None


def test_parse_key_id_good() -> None:
    assert keys.parse_key_id(GOOD) == "AbCdEf012345"


def test_hmac_match_and_mismatch() -> None:
    stored = keys.hash_key(PEPPER, GOOD)
    assert len(stored) == 32
    assert keys.matches(PEPPER, GOOD, stored)
    assert not keys.matches(PEPPER, GOOD[:-1] + "y", stored)
    assert not keys.matches(b"another-pepper-0123456789abcdef", GOOD, stored)
    assert keys.hash_key(PEPPER, GOOD) == stored  # deterministic


# --- authenticate ----------------------------------------------------------------------------------------


def _record(raw_key: str, **overrides: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key_id": keys.parse_key_id(raw_key),
        "secret_hmac": keys.hash_key(PEPPER, raw_key),
        "name": None,
        "team_id": 1,
        "team_name": "team",
        "user_id": None,
        "user_name": None,
        "allowed_models": None,
        "tags": (),
        "expires_at": None,
        "inactive_reason": None,
    }
    fields.update(overrides)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def test_authenticate_ok() -> None:
    new = keys.generate()
    record = _record(new.secret)
    assert authenticate({new.key_id: record}, PEPPER, new.secret) is record


def test_authenticate_unknown_id_and_wrong_secret_look_the_same() -> None:
    new, other = keys.generate(), keys.generate()
    table = {new.key_id: _record(new.secret)}
    wrong_secret = new.secret[:-1] + ("a" if new.secret[-1] != "a" else "b")
    messages = []
    for raw in (other.secret, wrong_secret, "not-a-key", ""):
        with pytest.raises(AuthenticationFailed) as info:
            authenticate(table, PEPPER, raw)
        assert info.value.status == 401
        assert info.value.code == "invalid_api_key"
        messages.append(info.value.message)
    assert len(set(messages)) == 1  # no hint whether the id exists


@pytest.mark.parametrize("reason", ["revoked", "team disabled", "user disabled"])
def test_authenticate_inactive(reason: str) -> None:
    new = keys.generate()
    with pytest.raises(AuthenticationFailed, match=rf"not active \({reason}\)"):
        authenticate({new.key_id: _record(new.secret, inactive_reason=reason)}, PEPPER, new.secret)


def test_inactive_reason_is_only_told_to_the_key_holder() -> None:
    new = keys.generate()
    table = {new.key_id: _record(new.secret, inactive_reason="revoked")}
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(table, PEPPER, new.secret[:-1] + ("a" if new.secret[-1] != "a" else "b"))
    assert "revoked" not in info.value.message


def test_authenticate_expired() -> None:
    new = keys.generate()
    with pytest.raises(AuthenticationFailed, match="expired"):
        authenticate({new.key_id: _record(new.secret, expires_at=time.time() - 1)}, PEPPER, new.secret)
    record = _record(new.secret, expires_at=time.time() + 3600)
    assert authenticate({new.key_id: record}, PEPPER, new.secret) is record


def test_authorize_model() -> None:
    record = _record(GOOD, allowed_models=frozenset({"a"}))
    authorize_model(record, "a")
    with pytest.raises(ModelNotAllowed) as info:
        authorize_model(record, "b")
    assert (info.value.status, info.value.param) == (403, "model")
    authorize_model(_record(GOOD), "anything")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer sk-gw-abc", "sk-gw-abc"),
        ("bearer sk-gw-abc", "sk-gw-abc"),
        ("BEARER sk-gw-abc", "sk-gw-abc"),
        ("Bearer  sk-gw-abc ", "sk-gw-abc"),
    ],
)
def test_bearer_token(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "didn't provide an API key"),
        ("", "didn't provide an API key"),
        ("Bearer", "must be 'Bearer <api key>'"),
        ("Bearer ", "must be 'Bearer <api key>'"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <api key>'"),
        ("sk-gw-abc", "must be 'Bearer <api key>'"),
    ],
)
def test_bearer_token_refused(header: str | None, fragment: str) -> None:
    with pytest.raises(AuthenticationFailed, match=fragment):
        bearer_token(header)


# --- pepper ----------------------------------------------------------------------------------------------


def test_configured_pepper_wins(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    assert keys.load_pepper("x" * 20, str(path)) == b"x" * 20
    assert not path.exists()


def test_pepper_file_created_0600_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "pepper"
    first = keys.load_pepper(None, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    assert path.read_bytes().strip() == first
    assert keys.load_pepper("", str(path)) == first  # an empty configured pepper means: use the file
    assert keys.load_pepper(None, str(path)) == first
    other = keys.load_pepper(None, str(tmp_path / "other"))
    assert other != first


def test_short_pepper_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 16"):
        keys.load_pepper(None, str(path))
