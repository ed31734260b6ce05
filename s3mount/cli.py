"""The ``s3mount`` command: argument parsing, error reporting, and dispatch.

``s3mount BUCKET[:PREFIX] MOUNTPOINT`` mounts; ``s3mount COMMAND ...`` runs a bucket or object
command.  Any failure becomes one line on stderr and a non-zero exit (a traceback only with
``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from s3mount import __version__
from s3mount.config import SETTINGS, ConfigError, env_settings
from s3mount.mount_cli import (
    READY,
    MountUsageError,
    add_mount_commands,
    daemonize,
    default_cache_dir,
    print_settings,
    resolve_mount,
    setup_daemon_logging,
    transfer_settings,
)
from s3mount.notify import notify, stderr_is_journal
from s3mount.objects_cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_object_commands
from s3mount.storage import ConnectionSettings, MiB, RetryPolicy, Storage, StorageError

BUCKET_ENV = "S3MOUNT_BUCKET"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before or after the command name (defaults applied later)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("connection")
    g.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: AWS)")
    g.add_argument("--region", help="region (default: from the profile or environment)")
    g.add_argument("--profile", help="named profile of the shared AWS config files")
    g.add_argument(
        "--path-style", action="store_true", help="path-style addressing (http://host/bucket/key)"
    )
    g.add_argument("--no-verify-ssl", action="store_true", help="do not check TLS certificates")
    g.add_argument("--ca-bundle", metavar="FILE", help="CA certificates to verify TLS with")
    g.add_argument(
        "--retries", type=int, metavar="N", help="attempts per request, the first included (5)"
    )
    g.add_argument(
        "--bucket",
        "-b",
        metavar="NAME",
        help=f"the bucket to work on (default: ${BUCKET_ENV})",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="s3mount",
        parents=[common],
        description="Mount an S3 bucket as a directory (s3mount BUCKET[:PREFIX] MOUNTPOINT), "
        "or run a bucket/object command.",
    )
    parser.add_argument("--version", action="version", version=f"s3mount {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_object_commands(sub, common)

    add_mount_commands(sub, common, _cmd_mount)

    p = sub.add_parser(
        "local-server",
        parents=[common],
        help="run an embedded local S3 endpoint (moto) for trying s3mount out",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_local_server, needs_storage=False)
    return parser


def _cmd_local_server(args: argparse.Namespace, _st: None) -> int:
    from s3mount.localserver import serve_forever

    serve_forever(args.host, args.port)
    return 0


def _cmd_mount(args: argparse.Namespace, _st: None) -> int:
    import trio

    from s3mount.daemon import MountConfig, MountError, serve
    from s3mount.fuse_ops import MountOptions

    res = resolve_mount(args)
    if args.dry_run:
        print_settings(res)
        return 0
    mountpoint = os.path.abspath(res.mountpoint)
    cache_dir = os.path.abspath(res.cache_dir or default_cache_dir(res.bucket, res.prefix))
    log_file = res.log_file
    if not res.foreground:
        if log_file is None and not stderr_is_journal():
            log_file = os.path.join(cache_dir, "s3mount.log")
        return daemonize(args.argv, log_file)
    ready_fd = args.ready_fd
    # the daemonized child logs to the stderr its parent set up; -f alone honours --log-file
    setup_daemon_logging(res.log_level, log_file if ready_fd is None else None)
    mopts = MountOptions(
        uid=os.getuid() if res.uid is None else res.uid,
        gid=os.getgid() if res.gid is None else res.gid,
        umask=res.umask,
        attr_timeout=res.attr_timeout,
        entry_timeout=res.attr_timeout,
        negative_timeout=res.negative_timeout,
    )
    cfg = MountConfig(
        bucket=res.bucket,
        prefix=res.prefix,
        mountpoint=mountpoint,
        connection=connection_settings(argparse.Namespace(**res.values)),
        transfer=transfer_settings(res.part_size),
        cache_dir=cache_dir,
        cache_size=res.cache_size * MiB,
        read_only=res.read_only,
        allow_other=res.allow_other,
        options=mopts,
        listing_ttl=res.listing_ttl,
        key_sync_timeout=res.key_sync_timeout,
        threads=res.threads,
        write_back=res.write_back,
        io_timeout=res.io_timeout,
        metadata=res.metadata,
        metrics_port=res.metrics_port,
        metrics_host=res.metrics_host,
    )
    where = f"s3://{res.bucket}/{res.prefix}"

    def on_ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)
        notify("READY=1", f"STATUS=serving {where} on {mountpoint}")

    try:
        trio.run(serve, cfg, on_ready)
    except MountError as exc:
        msg = f"s3mount: error: {exc}"
        if ready_fd is not None:
            os.write(ready_fd, str(exc).encode() + b"\n")
        notify(f"STATUS=failed: {exc}")
        print(msg, file=sys.stderr)
        return EXIT_FAILED
    return 0


def _with_mount_command(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``s3mount BUCKET MNT ...`` is short for ``s3mount mount BUCKET MNT ...``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    takes_value = {opt for a in parser._actions if a.nargs != 0 for opt in a.option_strings}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break
        if tok.startswith("-"):
            i += 2 if tok in takes_value else 1
            continue
        if tok not in sub.choices:
            return [*argv[:i], "mount", *argv[i:]]
        break
    return argv


def connection_settings(args: argparse.Namespace) -> ConnectionSettings:
    """The connection from the command line, else the ``S3MOUNT_*`` environment."""
    names = [name for name, setting in SETTINGS.items() if setting.connection]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    args = argparse.Namespace(**{**env_settings(os.environ, names), **given})
    verify: bool | str = True
    if getattr(args, "no_verify_ssl", False):
        verify = False
    elif getattr(args, "ca_bundle", None):
        verify = args.ca_bundle
    retries = getattr(args, "retries", None)
    if retries is not None and retries < 1:
        raise UsageError("--retries must be at least 1")
    return ConnectionSettings(
        endpoint_url=getattr(args, "endpoint_url", None),
        region=getattr(args, "region", None),
        profile=getattr(args, "profile", None),
        path_style=getattr(args, "path_style", False),
        verify=verify,
        retry=RetryPolicy(attempts=retries) if retries else RetryPolicy(),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    argv = _with_mount_command(argv, parser)
    args = parser.parse_args(argv)
    args.argv = argv
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="s3mount: %(levelname)s: %(message)s",
    )
    if not debug:
        for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("s3mount: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        storage = None
        if args.needs_storage:
            args.bucket = getattr(args, "bucket", None) or os.environ.get(BUCKET_ENV) or None
            storage = Storage(connection_settings(args), default_bucket=args.bucket)
        return args.func(args, storage)
    except (UsageError, MountUsageError, ConfigError) as exc:
        print(f"s3mount: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        if debug:
            logging.exception("failed")
        print(f"s3mount: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # stdout closed early (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print("s3mount: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --debug (the log has the rest)
        if debug:
            raise
        logging.getLogger("s3mount").critical("unexpected error (a bug)", exc_info=True)
        print(f"s3mount: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
