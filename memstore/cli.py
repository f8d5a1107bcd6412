"""`memstore` command line: `serve` runs a daemon; the other commands talk to a running one.

    memstore serve --backend lmdb --data-dir /data --port 50051
    memstore create-table ngram_l1 --rows 10000000 --dim 64 --dtype float16 --optimizer adam --lr 0.005
    memstore ls | stats | snapshot [TABLE] [--tag T] | restore TABLE --tag T | describe TABLE
             | drop-table TABLE | health
    memstore reshard --from DIR... --to OUT_DIR --shards M      (offline, see memstore/reshard.py)

Client commands find the servers with --target (or MEMSTORE_TARGET), default 127.0.0.1:50051: one
server or a whole cluster, in any cluster-spec form (a,b,c; pattern-{i}:port*N; @cluster.toml, see
memstore/cluster.py). They act on every shard: create/drop/snapshot/restore everywhere, ls/describe/
stats per shard. The token comes from --token or MEMSTORE_TOKEN.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from memstore.cluster import DEFAULT_TARGET, ENV_TARGET, ENV_TOKEN, resolve_targets
from memstore.config import (
    CHOICES,
    DEFAULT_SHOWN,
    HELP,
    TESTING_ONLY,
    ConfigError,
    ServerConfig,
    build_config,
)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field, so the flags can never drift from the config."""
    parser.add_argument("--config", help="TOML or YAML file with any of the options below")
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        is_bool = isinstance(default, bool)
        shown = DEFAULT_SHOWN.get(f.name, str(default).lower() if is_bool else repr(default))
        about = HELP.get(f.name, "").replace("%", "%%")  # argparse %-formats help
        choices = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else None
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            metavar=choices or ("true|false" if is_bool else type(default).__name__).upper(),
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=argparse.SUPPRESS if f.name in TESTING_ONLY else
                            f"{about} (default: {shown}; env MEMSTORE_{f.name.upper()})".lstrip())


class _DefaultsShown(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if "default" in text or not action.option_strings or unset:
            return text
        return f"{text} (default: %(default)s)"


def _tls(args):
    """TlsConfig from --tls-ca/--tls-client-cert/--tls-client-key/--tls-server-name, or None."""
    if not (args.tls_ca or args.tls_client_cert):
        return None
    from memstore.client import TlsConfig
    return TlsConfig(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)


def _client(args):
    """Every shard --target names (one server is a cluster of one)."""
    from memstore.shards import Shards
    return Shards(args.target, token=args.token, tls=_tls(args), timeout_s=args.timeout, retry_timeout_s=0)


def cmd_serve(args) -> int:
    from memstore.server import StartupError, serve, setup_logging
    flags = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    try:
        config = build_config(args.config, flags)
    except ConfigError as exc:
        print(f"memstore serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    try:
        serve(config)
    except (StartupError, OSError) as exc:  # a port in use, an unwritable data dir: a message, not a traceback
        print(f"memstore serve: {exc}", file=sys.stderr)
        return 1
    return 0


def optimizer_arg(text: str) -> tuple[str, float]:
    """--optimizer-arg KEY=VALUE, VALUE a number."""
    key, sep, value = text.partition("=")
    try:
        if not (sep and key):
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER (e.g. beta2=0.99), got {text!r}") from None


def cmd_create_table(args) -> int:
    with _client(args) as shards:  # every shard is asked first: a misordered list, a clash, creates nothing
        info = shards.create_table(
            args.name, args.rows, args.dim, dtype=args.dtype, init=args.init, init_scale=args.init_scale,
            seed=args.seed, optimizer=args.optimizer, lr=args.lr, if_not_exists=args.if_not_exists,
            **dict(args.optimizer_arg))
    print(_table_line(info) + _on_shards(shards))
    return 0


def cmd_ls(args) -> int:
    """One line per table: usage summed over the shards, and on how many shards it exists. A table
    missing on some shards, or whose specs differ between shards, is listed with a warning naming them."""
    from memstore.errors import FailedPrecondition
    with _client(args) as shards:
        per_shard = shards.each(lambda client: {t.spec.name: t for t in client.list_tables()})
    tables = {name: [tables.get(name) for tables in per_shard] for name in sorted(set().union(*per_shard))}
    views, warnings = {}, []
    for name, infos in tables.items():
        if None in infos:
            warnings.append(f"table {name} is missing on {shards.names([i for i, t in enumerate(infos) if t is None])}")
        try:
            views[name] = _table_dict(infos, shards.targets)
        except FailedPrecondition as exc:  # one broken table must not hide the others
            views[name] = {"name": name, "error": exc.message}
            warnings.append(exc.message)
    if args.json:
        print(json.dumps(list(views.values()), indent=2))
    else:
        # USED: materialised rows + state; RESIDENT: in memory now; RESERVED: claimed (memstore.memory)
        print(f"{'TABLE':24} {'ROWS':>14} {'DIM':>5} {'DTYPE':9} {'OPTIMIZER':16} {'MATERIALIZED':>13} "
              f"{'USED':>10} {'RESIDENT':>10} {'RESERVED':>10} {'SHARDS':>6}")
        for name, view in views.items():
            print(_ls_line(view) + f" {_present(tables[name]):>6}")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _ls_line(t: dict) -> str:
    if "error" in t:
        return f"{t['name']:24} {'(specs differ between shards: see the warning)':<94}"
    optimizer = f"{t['optimizer']['kind']}({t['optimizer']['lr']:g})"
    return (f"{t['name']:24} {t['num_rows']:>14} {t['dim']:>5} {t['dtype']:9} {optimizer:16} "
            f"{t['rows_materialized']:>13} {_human(t['bytes_used']):>10} {_human(t['bytes_resident']):>10} "
            f"{_human(t['bytes_reserved']):>10}")


def cmd_describe(args) -> int:
    """The table's spec and summed usage, then each shard's (NOT_FOUND names a shard that lacks it)."""
    with _client(args) as shards:
        if len(shards) > 1:
            shards.check_layout()  # a misordered list would label the shards wrongly
        infos = shards.each(lambda client: client.describe_table(args.name))
    print(json.dumps(_table_dict(infos, shards.targets), indent=2))
    return 0


def cmd_stats(args) -> int:
    """One server: its statistics. Several: {"shards": [each shard's, with "shard" and "target"]}."""
    with _client(args) as shards:
        per_shard = [_stats_dict(reply) for reply in shards.each(lambda client: client.stats())]
    if len(per_shard) == 1:
        print(json.dumps(per_shard[0], indent=2))
        return 0
    shard_keys = ({"shard": index, "target": target} for index, target in enumerate(shards.targets))
    print(json.dumps({"shards": [{**keys, **stats} for keys, stats in zip(shard_keys, per_shard)]}, indent=2))
    return 0


def cmd_snapshot(args) -> int:
    if args.tag and not args.name:
        raise ConfigError("snapshot --tag needs a TABLE")
    with _client(args) as shards:
        for paths in shards.each(lambda client: client.snapshot(args.name or "", tag=args.tag or "")):
            for path in paths:
                print(path)
    return 0


def cmd_restore(args) -> int:
    """Every shard rolls back, or none: a shard that lacks the tag is named before any is restored."""
    with _client(args) as shards:
        for path in shards.restore(args.name, args.tag):
            print(path)
    return 0


def cmd_drop_table(args) -> int:
    if not (args.yes or _confirmed(f"drop table {args.name} and all its snapshots and checkpoints on "
                                   f"{args.target}?")):
        print(f"memstore drop-table: not dropped: pass --yes to drop {args.name} "
              "(its rows, snapshots and checkpoints on every shard)", file=sys.stderr)
        return 1
    with _client(args) as shards:  # a shard that does not answer: nothing is dropped anywhere
        absent = shards.drop_table(args.name)
        already = f"; already dropped on {shards.names(absent)}" if absent else ""
    print(f"dropped {args.name}" + (f" (on {len(shards)} shards{already})" if len(shards) > 1 else ""))
    return 0


def _confirmed(question: str) -> bool:
    """Asks on a terminal; anything but y/yes, or no terminal at all (a script), is a no."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_health(args) -> int:
    """Exit 0 when every shard --target names is SERVING (one line per shard)."""
    serving = [_healthy(target, args) for target in resolve_targets(args.target)]  # ask each one, report each
    return 0 if all(serving) else 1


def _healthy(target: str, args) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    tls = _tls(args)
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(target, tls.credentials(), options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _usage(info) -> dict:
    return {"rows_materialized": info.rows_materialized, "bytes_used": info.bytes_used,
            "bytes_resident": info.bytes_resident, "bytes_reserved": info.bytes_reserved,
            "lookups": info.lookups, "updates": info.updates}


def _stats_dict(stats) -> dict:
    """A StatsResponse as plain JSON, the way `describe` prints: numbers as numbers, every field."""
    from memstore.client import table_info
    return {"version": stats.version, "backend": stats.backend, "read_only": stats.read_only,
            "shard_index": stats.shard_index, "shard_count": stats.shard_count,
            "process_resident_bytes": stats.process_resident_bytes, "process_virtual_bytes": stats.process_virtual_bytes,
            "ram_max_bytes": stats.ram_max_bytes,
            "counters": {k: int(v) if float(v).is_integer() else v for k, v in sorted(stats.counters.items())},
            "tables": [{**(info := table_info(t)).spec.to_dict(), **_usage_and_tags(info)} for t in stats.tables]}


def _table_dict(infos: list, targets: list[str]) -> dict:
    """One server: its view (its own shard_index/shard_count). Several: the table's spec with
    shard_count = the number of shards, usage summed, the checkpoint tags on every shard, and each
    shard's usage and tags ("missing" where it lacks the table)."""
    from memstore.shards import merge_infos
    merged = merge_infos(infos, targets)
    out = {**merged.spec.to_dict(), **_usage_and_tags(merged)}
    if len(targets) > 1:
        del out["shard_index"]
        out["shard_count"] = len(targets)
        out["shards"] = [{"shard": index, "target": target, **(_usage_and_tags(info) if info else {"missing": True})}
                         for index, (target, info) in enumerate(zip(targets, infos))]
    return out


def _usage_and_tags(info) -> dict:
    return {**_usage(info), "checkpoints": list(info.checkpoints)}


def _present(infos: list) -> str:
    return f"{sum(info is not None for info in infos)}/{len(infos)}"


def _on_shards(shards) -> str:
    return f" (on {len(shards)} shards)" if len(shards) > 1 else ""


def _table_line(info) -> str:
    s = info.spec
    return f"{s.name}: {s.num_rows} rows x {s.dim} {s.dtype}, {s.optimizer.kind}(lr={s.optimizer.lr:g})"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    from memstore import __version__
    parser = argparse.ArgumentParser(prog="memstore", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"memstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a memstore daemon")
    _add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)

    def client_command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_DefaultsShown)
        p.add_argument("--target", default=os.environ.get(ENV_TARGET, DEFAULT_TARGET),
                       help="a server or every shard: host:port[,host:port...], pattern-{i}.svc:port*N or "
                            "@cluster.toml (default: $MEMSTORE_TARGET, else %(default)s)")
        p.add_argument("--token", default=os.environ.get(ENV_TOKEN, ""),
                       help="bearer token (default: $MEMSTORE_TOKEN, or none)")  # never print its value
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
        p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (enables TLS)")
        p.add_argument("--tls-client-cert", help="PEM client certificate, for mutual TLS")
        p.add_argument("--tls-client-key", help="PEM client key, for mutual TLS")
        p.add_argument("--tls-server-name", help="name to check the server certificate against")
        p.set_defaults(func=func)
        return p

    create = client_command("create-table", cmd_create_table, "create a table")
    create.add_argument("name")
    create.add_argument("--rows", type=int, required=True, help="rows of the whole table (all shards)")
    create.add_argument("--dim", type=int, required=True, help="floats per row")
    create.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="row storage")
    create.add_argument("--init", default="normal", choices=["zeros", "normal", "uniform"], help="initial rows")
    create.add_argument("--init-scale", type=float, default=0.02, help="std (normal) or bound (uniform)")
    create.add_argument("--seed", type=int, default=0, help="init seed")
    create.add_argument("--optimizer", default="sgd", choices=["sgd", "adagrad", "rowwise_adagrad", "adam"],
                        help="applied by the server to every update")
    create.add_argument("--lr", type=float, default=0.01, help="learning rate")
    create.add_argument("--optimizer-arg", action="append", default=[], metavar="KEY=VALUE", type=optimizer_arg,
                        help="e.g. --optimizer-arg beta2=0.99 (repeatable)")
    create.add_argument("--if-not-exists", action="store_true", help="succeed if the same table exists")

    ls = client_command("ls", cmd_ls, "list tables")
    ls.add_argument("--json", action="store_true", help="JSON, as describe")
    client_command("stats", cmd_stats, "server and table statistics (JSON)")
    snap = client_command("snapshot", cmd_snapshot, "snapshot one table, or all")
    snap.add_argument("name", nargs="?")
    snap.add_argument("--tag", help="a named checkpoint of TABLE (what engram_client.checkpoint_tables takes)")
    restore = client_command("restore", cmd_restore, "roll a table back to a named checkpoint (--tag)")
    restore.add_argument("name")
    restore.add_argument("--tag", required=True)
    describe = client_command("describe", cmd_describe, "one table's spec and usage (JSON)")
    describe.add_argument("name")
    drop = client_command("drop-table", cmd_drop_table, "drop a table and its snapshots")
    drop.add_argument("name")
    drop.add_argument("--yes", "-y", action="store_true", help="drop without asking (needed without a terminal)")
    health = client_command("health", cmd_health, "exit 0 when the server is SERVING")
    health.add_argument("--service", default="", help="grpc.health.v1 service ('' = the server, or memstore.v1.MemStore)")

    from memstore import reshard  # offline: reads and writes data dirs, talks to no server
    resharder = sub.add_parser("reshard", help="offline: re-split N shards' snapshots into M shards")
    reshard.add_arguments(resharder)
    resharder.set_defaults(func=reshard.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"memstore: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `memstore ls | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        from memstore.errors import DeadlineExceeded, MemStoreError
        if isinstance(exc, MemStoreError):
            hint = f" (no answer within --timeout {args.timeout:g} s)" if isinstance(exc, DeadlineExceeded) else ""
            print(f"memstore {args.command}: {exc}{hint}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
