"""``lmgateway``: maintenance commands that work on the store, beside a running daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from attrs import evolve

from .config import ConfigError, build_config
from .errors import ApiError
from .security import require_bridge_allowed
from .sessions import SessionRecord, parse_time, validate_registration
from .store import REDIS, backend_of, open_table
from .store.cache import export_of, stats_of

if TYPE_CHECKING:
    from .store import Table

DAY = 86400.0


# The settings the CLI reads; the daemon's others (listeners, keys...) are none of its business.
CLI_SETTINGS = frozenset({"storage", "redis_prefix", "domains", "cleanup_days", "secret_file",
                          "bridge_url", "bridge_allow", "max_sessions_per_domain"})


def cmd_stats(store: Table, args, config, out) -> int:
    records, broken = store.load()
    stats = stats_of(records.values())
    for domain, count in stats["domains"].items():
        print(f"{domain}\t{count}", file=out)
    print(f"total\t{stats['total']}", file=out)
    if broken:
        print(f"unreadable\t{len(broken)}", file=out)
    backend = store.backend
    print(f"store\t{store.path}\t{store.size()} bytes\tbackend {backend}", file=out)
    return 0


def cmd_cleanup(store: Table, args, config, out) -> int:
    days = config.cleanup_days if args.days is None else args.days
    if days < 0:
        raise SystemExit("lmgateway: DAYS must be >= 0")
    if days == 0:
        return cmd_stats(store, args, config, out)
    cutoff = time.time() - days * DAY
    records, _ = store.load()
    removed = store.prune(cutoff, [r for r in records.values() if r.last_activity < cutoff])
    per_domain: dict[str, int] = {}
    for record in removed:
        per_domain[record.domain] = per_domain.get(record.domain, 0) + 1
    for domain, count in sorted(per_domain.items()):
        print(f"{domain}\t{count} removed", file=out)
    print(f"removed {len(removed)} sessions idle for over {days:g} days; "
          f"{len(records) - len(removed)} remain", file=out)
    return 0


def cmd_export(store: Table, args, config, out) -> int:
    records, _ = store.load()
    json.dump(export_of(records.values(), time.time()), out, indent=2, sort_keys=True)
    out.write("\n")
    return 0


def import_records(data, domains, now: float, bridge_allow: tuple[str, ...] = ("loopback",)
                   ) -> tuple[list[SessionRecord], list[str]]:
    """Validate a PHP-gateway sessions.json as the API would; keep its timestamps.

    Each record is marked used at ``now``: its own times may be months old, and the
    daemon prunes at startup, so an import that kept only them would be undone by the
    first start. created_at and updated_at stay as they were.
    """
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise ValueError('not a sessions file: expected {"domains": {...}}')
    accepted, skipped = [], []
    for domain, sessions in data["domains"].items():
        if not isinstance(sessions, dict):
            skipped.append(f"{domain}: not an object of sessions")
            continue
        for name, fields in sessions.items():
            where = f"{domain}/{name}"
            if not isinstance(fields, dict):
                skipped.append(f"{where}: not an object")
                continue
            if fields.get("models") == []:
                fields = dict(fields, models={})  # PHP's json_encode writes an empty map as []
            try:
                registration = validate_registration(
                    dict(fields, domain=domain, session_name=name), domains)
                if registration.bridge_base_url:
                    require_bridge_allowed(registration.bridge_base_url, bridge_allow)
                created = parse_time(fields.get("created_at") or now)
                updated = parse_time(fields.get("updated_at") or created)
                used = fields.get("last_used_at")
                used = max(parse_time(used), now) if used else now
                record = evolve(registration.record(updated, None), created_at=created,
                                last_used_at=used)
            except ApiError as e:
                skipped.append(f"{where}: {e.code}: {e.message}")
                continue
            except (ValueError, OverflowError) as e:
                skipped.append(f"{where}: INVALID_TIME: {e}")
                continue
            accepted.append(record)
    return accepted, skipped


def within_limits(records: list[SessionRecord], existing, limit: int) -> tuple[list, list[str]]:
    """Keep new sessions within --max-sessions-per-domain, as the API does."""
    held: dict[str, int] = {}
    for record in existing.values():
        held[record.domain] = held.get(record.domain, 0) + 1
    kept, skipped = [], []
    for record in records:
        if record.key not in existing:
            if held.get(record.domain, 0) >= limit:
                skipped.append(f"{record.key}: SESSION_LIMIT: {record.domain} holds {limit} sessions")
                continue
            held[record.domain] = held.get(record.domain, 0) + 1
        kept.append(record)
    return kept, skipped


def cmd_import(store: Table, args, config, out) -> int:
    try:
        with open(args.file, encoding="utf-8") if args.file != "-" else sys.stdin as source:
            data = json.load(source)
        records, skipped = import_records(data, config.domains, time.time(),
                                          config.bridge_allow_list)
    except OSError as e:
        raise SystemExit(f"lmgateway: cannot read {args.file!r}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"lmgateway: {args.file!r}: {e}") from None
    records, over = within_limits(records, store.load()[0], config.max_sessions_per_domain)
    skipped += over
    for record in records:
        store.put(record)
    for reason in skipped:
        print(f"skipped {reason}", file=out)
    print(f"imported {len(records)}, skipped {len(skipped)}", file=out)
    return 1 if skipped else 0


def cmd_revoke(args, environ, out) -> int:
    from .sessions import SESSION_NAME
    from .tokens import revoke

    try:
        config = build_config({"storage": args.storage, "secret-file": args.secret_file,
                               "redis-prefix": args.redis_prefix}, environ, CLI_SETTINGS)
    except ConfigError as e:
        raise SystemExit(f"lmgateway: {e}") from None
    if not SESSION_NAME.fullmatch(args.name):
        raise SystemExit(f"lmgateway: {args.name!r} is not a session name")
    try:
        if backend_of(config.storage) == REDIS:
            from .store.redis_commands import RedisSessionFile

            store = open_table(config)
            assert isinstance(store, RedisSessionFile)  # the secret lives with the sessions
            try:
                generation = store.revoke_tokens(args.name)
            finally:
                store.close()
        else:
            if not os.path.exists(config.registration_secret_file):
                raise SystemExit(f"lmgateway: no registration secret at "
                                 f"{config.registration_secret_file!r}, so no tokens to revoke "
                                 "(check --storage or --secret-file)")
            generation = revoke(config.registration_secret_file, args.name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"lmgateway: cannot revoke: {e}") from None
    print(f"revoked every registration token of {args.name!r} (now generation {generation}); "
          "running gateways refuse them within a second. Generate a new userscript for it.",
          file=out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmgateway", description="Maintenance commands for lmarena-gateway's session store; "
        "they work beside a running daemon.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_command(name, help):
        command = commands.add_parser(name, help=help)
        command.add_argument("--storage", help="session store (env STORAGE_PATH)")
        command.add_argument("--domains", help="allowed domains (env GATEWAY_ALLOWED_DOMAINS)")
        command.add_argument("--redis-prefix", help="Redis key prefix (env GATEWAY_REDIS_PREFIX)")
        command.add_argument("--bridge-allow", help="hosts imported bridge URLs may name "
                             "(env GATEWAY_BRIDGE_ALLOW)")
        return command

    cleanup = store_command("cleanup", "prune idle sessions now; 'cleanup 0' only prints stats")
    cleanup.add_argument("days", nargs="?", type=float, metavar="DAYS",
                         help="idle days (default: GATEWAY_SESSION_CLEANUP_DAYS or 30)")
    cleanup.set_defaults(run=cmd_cleanup)
    store_command("stats", "sessions per domain, total, store size").set_defaults(run=cmd_stats)
    importer = store_command("import", "import a PHP gateway sessions.json (or our export)")
    importer.add_argument("file", metavar="FILE", help="the JSON file, or - for stdin")
    importer.set_defaults(run=cmd_import, create=True)
    store_command("export", "write every session to stdout as JSON").set_defaults(run=cmd_export)

    revoke = commands.add_parser("revoke", help="revoke the registration tokens of one session name")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--storage", help="session store (env STORAGE_PATH); the secret lives beside it")
    revoke.add_argument("--secret-file", help="registration secret (env GATEWAY_SECRET_FILE)")
    revoke.add_argument("--redis-prefix", help="Redis key prefix (env GATEWAY_REDIS_PREFIX)")

    fake = commands.add_parser("fake-bridge", help="serve canned bridge answers for demos and tests")
    fake.add_argument("--listen", default="tcp:5102:interface=127.0.0.1", metavar="ENDPOINT")
    fake.add_argument("--chunks", type=int, default=8, metavar="N")
    fake.add_argument("--delay-ms", type=float, default=50.0, metavar="D")
    fake.add_argument("--api-key", default=None, help="require this bearer key")
    arena = commands.add_parser("fake-arena", help="stand in for arena.ai: a page with models and "
                                "a reCAPTCHA stub, and the two streaming calls with their checks")
    arena.add_argument("--listen", default="tcp:8443:interface=127.0.0.1", metavar="ENDPOINT",
                       help="e.g. ssl:8443:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem")
    arena.add_argument("--chunks", type=int, default=6, metavar="N")
    arena.add_argument("--delay-ms", type=float, default=20.0, metavar="D")
    return parser


def main(argv=None, environ=None, out=None) -> int:
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    environ = os.environ if environ is None else environ
    if args.command == "fake-bridge":
        from .fakebridge import main as fake_main

        return fake_main(args.listen, args.chunks, args.delay_ms, args.api_key)
    if args.command == "fake-arena":
        from .fakearena import main as arena_main

        return arena_main(args.listen, args.delay_ms, args.chunks)
    if args.command == "revoke":
        return cmd_revoke(args, environ, out)
    try:
        config = build_config({"storage": args.storage, "domains": args.domains,
                               "redis-prefix": args.redis_prefix,
                               "bridge-allow": args.bridge_allow}, environ, CLI_SETTINGS)
    except ConfigError as e:
        raise SystemExit(f"lmgateway: {e}") from None
    try:
        store = open_table(config, create=getattr(args, "create", False))
    except FileNotFoundError as e:
        raise SystemExit(f"lmgateway: {e.args[0]}") from None
    except OSError as e:
        raise SystemExit(f"lmgateway: cannot open the session store: {e}") from None
    try:
        return args.run(store, args, config, out)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
