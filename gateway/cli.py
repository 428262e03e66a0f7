"""The `gateway` command: serve, demo, db, teams, users, keys. `gateway <command> --help` explains each."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from gateway import accounts
from gateway.limits.overrides import OverrideError
from gateway.metering.reports import ReportError
from gateway.settings import DEFAULT_CONFIG_PATH, Settings, SettingsError, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _engine(args: argparse.Namespace) -> Any:
    from gateway.db.engine import create_engine

    return create_engine(_settings(args).database.url)


def _pepper(settings: Settings) -> bytes:
    from gateway.auth.keys import load_pepper

    return load_pepper(settings.auth.pepper, settings.auth.pepper_file)


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _print_rows(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, default=_format_cell, indent=2))
        return
    table = [[_format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in table]) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip())
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


# --- serve / demo ----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.serve import StartupError, preflight, run_worker, supervise

    settings = _settings(args)
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        settings = settings.model_copy(update={"listen": settings.listen.model_copy(update=overrides)})
    configure_logging()
    config_path = args.config or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH
    if args.worker_process is not None:  # a child of `supervise`: the parent did the preflight
        run_worker(settings, reuse_port=True, label=f" (worker {args.worker_process})", config_path=config_path)
        return 0
    workers = args.workers or settings.server.workers
    try:
        if workers > 1 and settings.listen.port == 0:
            raise StartupError("--workers > 1 needs a fixed port (0 would give each worker its own)")
        preflight(settings, workers)
    except StartupError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    extra = []
    if args.host:
        extra += ["--host", args.host]
    if args.port is not None:
        extra += ["--port", str(args.port)]
    return supervise(config_path, workers, settings, extra)


def cmd_ledger_writer(args: argparse.Namespace) -> int:
    from gateway.ledger_process import run_ledger_writer
    from gateway.logs import configure_logging

    configure_logging()
    run_ledger_writer(_settings(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args.config)


# --- db --------------------------------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.db import migrate

    engine = _engine(args)
    migrate.upgrade(engine, args.revision)
    print(f"database at revision {migrate.current_revision(engine)}")
    return 0


def cmd_db_downgrade(args: argparse.Namespace) -> int:
    from gateway.db import migrate

    engine = _engine(args)
    migrate.downgrade(engine, args.revision)
    print(f"database at revision {migrate.current_revision(engine)}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from gateway.db import migrate

    engine = _engine(args)
    print(f"current: {migrate.current_revision(engine)}  head: {migrate.head_revision()}")
    return 0


# --- teams / users ---------------------------------------------------------------------------------------


def cmd_teams_create(args: argparse.Namespace) -> int:
    team_id = accounts.create_team(_engine(args), args.name)
    print(f"team {args.name!r} created (id {team_id})")
    return 0


def cmd_teams_list(args: argparse.Namespace) -> int:
    _print_rows(
        accounts.list_teams(_engine(args)),
        ["id", "name", "disabled", "active_keys", "created_at"],
        args.format,
    )
    return 0


def _set_team(disabled: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        accounts.set_team_disabled(_engine(args), args.name, disabled)
        print(f"team {args.name!r} {'disabled: its keys stop working' if disabled else 'enabled'}")
        return 0

    return run


def cmd_users_create(args: argparse.Namespace) -> int:
    user_id = accounts.create_user(_engine(args), args.name, args.email)
    print(f"user {args.name!r} created (id {user_id})")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    _print_rows(accounts.list_users(_engine(args)), ["id", "name", "email", "disabled", "created_at"], args.format)
    return 0


def _set_user(disabled: bool) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        accounts.set_user_disabled(_engine(args), args.name, disabled)
        print(f"user {args.name!r} {'disabled: their keys stop working' if disabled else 'enabled'}")
        return 0

    return run


# --- keys ------------------------------------------------------------------------------------------------


def _csv(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.db.engine import create_engine

    created = accounts.create_key(
        create_engine(settings.database.url),
        _pepper(settings),
        team=args.team,
        user=args.user,
        models=_csv(args.models),
        expires_in=accounts.parse_duration(args.expires) if args.expires else None,
        name=args.name,
        tags=_csv(args.tags),
    )
    if args.team_admin:
        _flag_team_admin(create_engine(settings.database.url), created.key_id)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "key": created.secret,
                    "prefix": created.display_prefix,
                    "team": created.team,
                    "user": created.user,
                    "expires_at": _format_cell(created.expires_at),
                }
            )
        )
        return 0
    print(created.secret)
    print(
        f"# {created.display_prefix} for team {created.team}"
        + (f", user {created.user}" if created.user else "")
        + (f", expires {_format_cell(created.expires_at)}" if created.expires_at else "")
        + ". The key is shown only this once.",
        file=sys.stderr,
    )
    return 0


def _flag_team_admin(engine: Any, key_id: str) -> None:
    """Make a key its team's admin (admin API and dashboard, own team only)."""
    from gateway.db.schema import api_keys
    from gateway.snapshot import bump_version

    with engine.begin() as connection:
        connection.execute(api_keys.update().where(api_keys.c.id == key_id).values(team_admin=True))
        bump_version(connection)


def cmd_keys_list(args: argparse.Namespace) -> int:
    rows = accounts.list_keys(_engine(args), team=args.team)
    _print_rows(
        rows,
        ["prefix", "name", "team", "user", "models", "created_at", "last_used_at", "expires_at", "state"],
        args.format,
    )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    prefix = accounts.revoke_key(_engine(args), args.key)
    print(f"{prefix} revoked; every gateway process refuses it within a second")
    return 0


# --- admin keys ------------------------------------------------------------------------------------------


def cmd_admin_keys_create(args: argparse.Namespace) -> int:
    from gateway.admin.credentials import create_admin_key
    from gateway.db.engine import create_engine

    settings = _settings(args)
    with create_engine(settings.database.url).begin() as connection:
        created = create_admin_key(connection, _pepper(settings), args.name)
    if args.format == "json":
        print(json.dumps({"key": created.secret, "prefix": created.display_prefix, "name": args.name}))
        return 0
    print(created.secret)
    print(f"# {created.display_prefix}: organisation admin key. It is shown only this once.", file=sys.stderr)
    return 0


def cmd_admin_keys_list(args: argparse.Namespace) -> int:
    from gateway.admin.credentials import list_admin_keys

    with _engine(args).connect() as connection:
        rows = list_admin_keys(connection)
    _print_rows(rows, ["prefix", "name", "created_at", "last_used_at", "state"], args.format)
    return 0


def cmd_admin_keys_revoke(args: argparse.Namespace) -> int:
    from gateway.admin.credentials import revoke_admin_key

    with _engine(args).begin() as connection:
        if not revoke_admin_key(connection, args.key):
            raise accounts.AccountError(f"admin key {args.key!r} does not exist or is already revoked")
    print(f"{args.key} revoked")
    return 0


# --- limits --------------------------------------------------------------------------------------------

_LIMIT_FLAGS = ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens")
_COST_FLAGS = ("daily_cost_usd", "monthly_cost_usd")


def _limit_value(text: str, *, usd: bool = False) -> int | None:
    from decimal import Decimal, InvalidOperation

    from gateway.limits.policy import UNLIMITED
    from gateway.metering.cost import usd_to_nano

    lowered = text.strip().lower()
    if lowered in ("unlimited", "none"):
        return UNLIMITED
    if lowered == "inherit":
        return None
    try:
        return usd_to_nano(Decimal(text)) if usd else int(text)
    except (InvalidOperation, ValueError):
        raise accounts.AccountError(f"cannot read limit value {text!r}: a number, 'unlimited' or 'inherit'") from None


def _limit_target(args: argparse.Namespace) -> tuple[str, str, str]:
    if args.model_cap:
        return "model", args.model_cap, ""
    if args.team and args.model:
        return "team_model", args.team, args.model
    for scope in ("team", "user", "key"):
        if getattr(args, scope):
            return scope, getattr(args, scope), ""
    raise accounts.AccountError("say whose limits: --team T [--model M], --user U, --key PREFIX or --model-cap M")


def cmd_limits_set(args: argparse.Namespace) -> int:
    from gateway.limits.overrides import set_override

    values: dict[str, Any] = {}
    for name in _LIMIT_FLAGS:
        if getattr(args, name) is not None:
            values[name] = _limit_value(getattr(args, name))
    for name in _COST_FLAGS:
        if getattr(args, name) is not None:
            values[name.replace("_usd", "_nanousd")] = _limit_value(getattr(args, name), usd=True)
    if args.budget_mode:
        values["budget_mode"] = None if args.budget_mode == "inherit" else args.budget_mode
    if not values:
        raise accounts.AccountError("nothing to set: give at least one of --rpm, --tpm, --concurrency, budgets")
    scope, subject, model = _limit_target(args)
    set_override(_engine(args), scope, subject, values, model=model)
    print(f"limits of {scope} {subject!r}{' / ' + model if model else ''} updated; in force within a second")
    return 0


def cmd_limits_clear(args: argparse.Namespace) -> int:
    from gateway.limits.overrides import clear_override

    scope, subject, model = _limit_target(args)
    cleared = clear_override(_engine(args), scope, subject, model=model)
    print("override removed: configured defaults apply" if cleared else "there was no override")
    return 0


def cmd_limits_list(args: argparse.Namespace) -> int:
    from gateway.limits.overrides import VALUE_FIELDS, list_overrides

    _print_rows(list_overrides(_engine(args)), ["scope", "subject", "model", *VALUE_FIELDS], args.format)
    return 0


# --- usage ---------------------------------------------------------------------------------------------


def _team_id(engine: Any, name: str | None) -> int | None:
    if name is None:
        return None
    import sqlalchemy as sa

    from gateway.db.schema import teams

    with engine.connect() as connection:
        team_id = connection.execute(sa.select(teams.c.id).where(teams.c.name == name)).scalar()
    if team_id is None:
        raise accounts.AccountError(f"team {name!r} does not exist")
    return int(team_id)


def cmd_usage_report(args: argparse.Namespace) -> int:
    import csv

    from gateway.metering.reports import default_range, parse_day_or_time, usage_report

    engine = _engine(args)
    start, end = default_range()
    if args.start:
        start = parse_day_or_time(args.start)
    if args.end:
        end = parse_day_or_time(args.end)
    rows = usage_report(engine, start=start, end=end, group_by=args.group_by, team_id=_team_id(engine, args.team))
    columns = [
        "group",
        "requests",
        "errors",
        "prompt_tokens",
        "cached_prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_nanousd",
        "cost_usd",
    ]
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_rows(rows, columns, args.format)
    return 0


def cmd_usage_forget(args: argparse.Namespace) -> int:
    from gateway.metering.reports import forget_end_user

    engine = _engine(args)
    deleted = forget_end_user(engine, args.end_user, team_id=_team_id(engine, args.team))
    print(f"{deleted} ledger rows of end user {args.end_user!r} deleted; rollup totals are kept")
    return 0


def cmd_usage_gpu_share(args: argparse.Namespace) -> int:
    from decimal import Decimal

    from gateway.metering.chargeback import gpu_share
    from gateway.metering.reports import default_range, parse_day_or_time

    start, end = default_range()
    start = parse_day_or_time(args.start) if args.start else start
    end = parse_day_or_time(args.end) if args.end else end
    rows = gpu_share(_engine(args), deployment=args.deployment, start=start, end=end, gpu_hours=Decimal(args.gpu_hours))
    _print_rows(rows, ["team", "tokens", "share", "gpu_hours"], args.format)
    return 0


def cmd_db_maintain(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from gateway.db.partitions import drop_partitions_before, ensure_partitions, month_start

    engine = _engine(args)
    with engine.begin() as connection:
        created = ensure_partitions(connection)
        dropped: list[str] = []
        if args.retention_months is not None:
            now = datetime.now(UTC)
            months = now.year * 12 + now.month - 1 - args.retention_months
            dropped = drop_partitions_before(connection, month_start(months // 12, months % 12 + 1))
    print(f"partitions created: {', '.join(created) or 'none'}; dropped: {', '.join(dropped) or 'none'}")
    return 0


# --- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="OpenAI-compatible LLM API gateway: keys, quotas, routing, usage ledger."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"configuration file (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG_PATH})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default: from config)")
    serve.add_argument("--host", help="override listen.host")
    serve.add_argument("--port", type=int, help="override listen.port (0: any free port)")
    serve.add_argument("--worker-process", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    writer = commands.add_parser(
        "ledger-writer", parents=[common], help="move buffered usage into SQL (`serve` runs one itself)"
    )
    writer.set_defaults(func=cmd_ledger_writer)

    demo = commands.add_parser(
        "demo", parents=[common], help="embedded demo: SQLite, mock backend, a demo key printed, then serve"
    )
    demo.set_defaults(func=cmd_demo)

    db = commands.add_parser("db", help="database schema (Alembic migrations)")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", parents=[common], help="migrate to the newest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=cmd_db_upgrade)
    downgrade = db_commands.add_parser("downgrade", parents=[common], help="migrate back to a revision")
    downgrade.add_argument("revision", help="target revision, e.g. base or -1")
    downgrade.set_defaults(func=cmd_db_downgrade)
    db_commands.add_parser("current", parents=[common], help="show the schema revision").set_defaults(
        func=cmd_db_current
    )
    maintain = db_commands.add_parser(
        "maintain", parents=[common], help="create upcoming ledger partitions; drop raw months past retention"
    )
    maintain.add_argument("--retention-months", type=int, help="keep this many whole months of raw rows")
    maintain.set_defaults(func=cmd_db_maintain)

    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--format", choices=["table", "json"], default="table")

    teams = commands.add_parser("teams", help="teams: quotas and spend are tracked per team")
    team_commands = teams.add_subparsers(dest="teams_command", required=True, metavar="ACTION")
    team_create = team_commands.add_parser("create", parents=[common], help="create a team")
    team_create.add_argument("name")
    team_create.set_defaults(func=cmd_teams_create)
    team_commands.add_parser("list", parents=[common, listing], help="list teams").set_defaults(func=cmd_teams_list)
    for action, disabled in (("disable", True), ("enable", False)):
        sub = team_commands.add_parser(action, parents=[common], help=f"{action} a team and so all its keys")
        sub.add_argument("name")
        sub.set_defaults(func=_set_team(disabled))

    users = commands.add_parser("users", help="users: people or services that own keys")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    user_create = user_commands.add_parser("create", parents=[common], help="create a user")
    user_create.add_argument("name")
    user_create.add_argument("--email")
    user_create.set_defaults(func=cmd_users_create)
    user_commands.add_parser("list", parents=[common, listing], help="list users").set_defaults(func=cmd_users_list)
    for action, disabled in (("disable", True), ("enable", False)):
        sub = user_commands.add_parser(action, parents=[common], help=f"{action} a user and so all their keys")
        sub.add_argument("name")
        sub.set_defaults(func=_set_user(disabled))

    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser("create", parents=[common], help="create a key; prints the secret once")
    create.add_argument("--team", required=True)
    create.add_argument("--user")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    create.add_argument("--expires", help="lifetime, e.g. 12h, 30d, 2w (default: never)")
    create.add_argument("--name", help="a label for the key")
    create.add_argument("--tags", help="comma-separated tags / cost centres for usage reports")
    create.add_argument("--format", choices=["text", "json"], default="text")
    create.set_defaults(func=cmd_keys_create)
    key_list = key_commands.add_parser("list", parents=[common, listing], help="list keys (prefixes only)")
    key_list.add_argument("--team")
    key_list.set_defaults(func=cmd_keys_list)
    create.add_argument(
        "--team-admin", action="store_true", help="the key may also manage its team (admin API, dashboard)"
    )
    revoke = key_commands.add_parser("revoke", parents=[common], help="revoke a key (by prefix or id)")
    revoke.add_argument("key")
    revoke.set_defaults(func=cmd_keys_revoke)
    admin_keys = commands.add_parser("admin-keys", help="organisation admin keys (admin API, dashboard)")
    admin_commands = admin_keys.add_subparsers(dest="admin_keys_command", required=True, metavar="ACTION")
    admin_create = admin_commands.add_parser("create", parents=[common], help="create one; prints the secret once")
    admin_create.add_argument("--name", help="a label, e.g. who holds it")
    admin_create.add_argument("--format", choices=["text", "json"], default="text")
    admin_create.set_defaults(func=cmd_admin_keys_create)
    admin_commands.add_parser("list", parents=[common, listing], help="list admin keys").set_defaults(
        func=cmd_admin_keys_list
    )
    admin_revoke = admin_commands.add_parser("revoke", parents=[common], help="revoke an admin key (by prefix)")
    admin_revoke.add_argument("key")
    admin_revoke.set_defaults(func=cmd_admin_keys_revoke)

    usage = commands.add_parser("usage", help="usage and cost reports from the ledger")
    usage_commands = usage.add_subparsers(dest="usage_command", required=True, metavar="ACTION")
    report = usage_commands.add_parser("report", parents=[common], help="tokens and cost, grouped")
    report.add_argument("--team", help="only this team")
    report.add_argument("--from", dest="start", help="start (UTC day or ISO time; default: start of this month)")
    report.add_argument("--to", dest="end", help="end, exclusive (default: end of today)")
    report.add_argument(
        "--group-by", default="model", choices=["team", "user", "end-user", "key", "tag", "model", "day", "hour"]
    )
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(func=cmd_usage_report)
    share = usage_commands.add_parser(
        "gpu-share", parents=[common, listing], help="split a vLLM pool's GPU-hours across teams by token share"
    )
    share.add_argument("--deployment", required=True)
    share.add_argument("--gpu-hours", required=True, help="GPU-hours the pool cost over the period")
    share.add_argument("--from", dest="start")
    share.add_argument("--to", dest="end")
    share.set_defaults(func=cmd_usage_gpu_share)
    forget = usage_commands.add_parser("forget", parents=[common], help="delete an end user's raw ledger rows")
    forget.add_argument("--end-user", required=True)
    forget.add_argument("--team")
    forget.set_defaults(func=cmd_usage_forget)

    limits = commands.add_parser("limits", help="per-team/user/key/model limit overrides (no restart needed)")
    limit_commands = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--team", help="a team (with --model: that team's use of the model)")
    target.add_argument("--model", help="with --team: the team x model scope")
    target.add_argument("--user", help="a user")
    target.add_argument("--key", help="a key, by prefix")
    target.add_argument("--model-cap", help="the organisation-wide cap of a model")
    limit_set = limit_commands.add_parser(
        "set",
        parents=[common, target],
        help="set limits; values: a number, 'unlimited', or 'inherit' (use the configured default)",
    )
    for name in _LIMIT_FLAGS:
        limit_set.add_argument(f"--{name.replace('_', '-')}", dest=name)
    for name in _COST_FLAGS:
        limit_set.add_argument(f"--{name.replace('_', '-')}", dest=name, help="USD")
    limit_set.add_argument("--budget-mode", choices=["hard", "soft", "inherit"])
    limit_set.set_defaults(func=cmd_limits_set)
    limit_clear = limit_commands.add_parser("clear", parents=[common, target], help="remove an override")
    limit_clear.set_defaults(func=cmd_limits_clear)
    limit_commands.add_parser("list", parents=[common, listing], help="list overrides").set_defaults(
        func=cmd_limits_list
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except (accounts.AccountError, OverrideError, ReportError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
