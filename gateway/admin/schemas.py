"""Request bodies of the admin API, as pydantic models: they validate input and give the OpenAPI schemas."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")]
Duration = Annotated[str, Field(pattern=r"^\s*\d+\s*[smhdw]\s*$", examples=["30d", "12h"])]
LimitValue = int | Literal["unlimited"] | None
CostValue = Decimal | Literal["unlimited"] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeamCreate(_Body):
    name: Name


class TeamUpdate(_Body):
    disabled: bool


class UserCreate(_Body):
    name: Name
    email: str | None = Field(None, max_length=256)


class UserUpdate(_Body):
    disabled: bool


class KeyCreate(_Body):
    team: Name | None = Field(None, description="required for organisation admins; a team admin's own team")
    user: Name | None = None
    models: list[str] | None = Field(None, description="models the key may use (default: all)")
    expires_in: Duration | None = Field(None, description="lifetime, e.g. 30d (default: never expires)")
    name: str | None = Field(None, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = None
    team_admin: bool = Field(False, description="may manage its team through the admin API (org admins only)")


class KeyRotate(_Body):
    overlap: Duration = Field("24h", description="how long the old key keeps working")


class LimitsSet(_Body):
    # Descriptions are config, not docstrings: the workers that serve the OpenAPI document run with -OO.
    model_config = ConfigDict(
        json_schema_extra={
            "description": 'Only the fields sent change. A number sets the limit, "unlimited" lifts it, '
            "null inherits the default."
        }
    )

    model: str | None = Field(None, description="for the team_model scope: the model")
    rpm: LimitValue = None
    tpm: LimitValue = None
    concurrency: LimitValue = None
    daily_tokens: LimitValue = None
    monthly_tokens: LimitValue = None
    daily_cost_usd: CostValue = None
    monthly_cost_usd: CostValue = None
    budget_mode: Literal["hard", "soft"] | None = None


class PriceCreate(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "description": "USD per one million tokens; a new effective-dated row (history is never edited)."
        }
    )

    model: str = Field(min_length=1, max_length=128)
    deployment: str | None = Field(None, max_length=128, description="only this deployment (default: the model)")
    effective_from: datetime | None = Field(None, description="default: now; never in the past")
    prompt: Decimal = Field(ge=0, decimal_places=9)
    completion: Decimal = Field(ge=0, decimal_places=9)
    cached_prompt: Decimal | None = Field(None, ge=0, decimal_places=9)


class AdminKeyCreate(_Body):
    name: str | None = Field(None, max_length=128)
