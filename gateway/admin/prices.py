"""Prices through the admin API: effective-dated rows, never edited in place, so a price change never rewrites
the cost of past requests. A new row takes effect at its `effective_from` (now, or later); the snapshot reload
that the version bump triggers puts it in force in every process within a second."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from gateway.admin import audit
from gateway.admin.errors import Conflict
from gateway.admin.principal import Principal
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import prices
from gateway.errors import InvalidRequest
from gateway.metering.cost import nano_to_usd, usd_to_nano
from gateway.metering.prices import MODEL_DEFAULT
from gateway.snapshot import bump_version

# A price may start a little in the past (clock skew between the caller and us), never earlier: older rows
# priced requests that are already in the ledger.
_SKEW = timedelta(minutes=5)


def _out(row: Any, now: datetime, current_ids: set[int]) -> dict[str, Any]:
    effective = as_utc(row["effective_from"])
    return {
        "id": row["id"],
        "model": row["model"],
        "deployment": row["deployment"] or None,
        "effective_from": effective,
        "prompt_usd_per_mtok": str(nano_to_usd(row["prompt_nanousd_per_mtok"])),
        "completion_usd_per_mtok": str(nano_to_usd(row["completion_nanousd_per_mtok"])),
        "cached_prompt_usd_per_mtok": str(nano_to_usd(row["cached_prompt_nanousd_per_mtok"])),
        "source": row["source"],
        "current": row["id"] in current_ids,
        "scheduled": effective is not None and effective > now,
    }


def list_prices(connection: sa.Connection, model: str | None) -> list[dict[str, Any]]:
    query = sa.select(prices).order_by(prices.c.model, prices.c.deployment, prices.c.effective_from)
    if model:
        query = query.where(prices.c.model == model)
    rows = connection.execute(query).mappings().all()
    now = utcnow()
    latest: dict[tuple[str, str], int] = {}
    for row in rows:  # ordered by effective_from: the last one already in force is the current one
        effective = as_utc(row["effective_from"])
        if effective is not None and effective <= now:
            latest[(row["model"], row["deployment"])] = row["id"]
    return [_out(row, now, set(latest.values())) for row in rows]


def create_price(
    connection: sa.Connection,
    principal: Principal,
    *,
    model: str,
    deployment: str | None,
    effective_from: datetime | None,
    prompt: Decimal,
    completion: Decimal,
    cached_prompt: Decimal | None,
    request_id: str,
) -> dict[str, Any]:
    principal.require_org_admin("change prices")
    now = utcnow()
    effective = as_utc(effective_from) if effective_from is not None else now
    assert effective is not None
    if effective < now - _SKEW:
        raise InvalidRequest(
            "effective_from is in the past: a price change never rewrites history.", param="effective_from"
        )
    try:
        values = {
            "prompt_nanousd_per_mtok": usd_to_nano(prompt),
            "completion_nanousd_per_mtok": usd_to_nano(completion),
            "cached_prompt_nanousd_per_mtok": usd_to_nano(cached_prompt if cached_prompt is not None else prompt),
        }
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    try:
        with connection.begin_nested():
            result = connection.execute(
                prices.insert().values(
                    model=model,
                    deployment=deployment or MODEL_DEFAULT,
                    effective_from=effective,
                    source="admin",
                    **values,
                )
            )
    except sa.exc.IntegrityError as exc:
        raise Conflict("A price for this model and deployment already starts at that moment.") from exc
    bump_version(connection)
    assert result.inserted_primary_key is not None
    price_id = int(result.inserted_primary_key[0])
    created = next(row for row in list_prices(connection, model) if row["id"] == price_id)
    audit.record(
        connection,
        principal,
        "price.create",
        f"price:{model}" + (f"/{deployment}" if deployment else ""),
        team_id=None,
        after=created,
        request_id=request_id,
    )
    return created
