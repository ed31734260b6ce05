"""The mount commands: ``mount`` (also ``s3mount BUCKET[:PREFIX] MOUNTPOINT``), ``unmount``,
``status``.  The mount daemonizes by starting itself again in the foreground, detached, and
returns once the child says the mount answers."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import platformdirs

from s3mount.control import INVALIDATE_XATTR, NO_WAIT_XATTR, STATUS_XATTR, SYNC_XATTR
from s3mount.storage import MiB, TransferSettings

EXIT_OK, EXIT_FAILED = 0, 3
READY = b"READY\n"

# mount(8) options that mean nothing to s3mount itself (fstab, mount helpers).
IGNORED_O = {
    "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "auto", "noauto", "_netdev",
    "nofail", "user", "users", "defaults", "atime", "noatime", "relatime", "async", "sync",
}  # fmt: skip
FLAG_O = {"ro": "read_only", "read_only": "read_only", "allow_other": "allow_other"}


class MountUsageError(Exception):
    pass


def add_mount_commands(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, run: Callable
) -> None:
    p = sub.add_parser(
        "mount",
        parents=[common],
        help="mount a bucket: s3mount [mount] BUCKET[:PREFIX] MOUNTPOINT",
        description="Mount BUCKET (or the sub-tree PREFIX of it) on MOUNTPOINT. Returns once "
        "the mount answers; with -f it stays in front and logs to stderr.",
    )
    p.add_argument("source", metavar="BUCKET[:PREFIX]")
    p.add_argument("mountpoint")
    p.add_argument("-f", "--foreground", action="store_true")
    p.add_argument(
        "-o",
        dest="o",
        action="append",
        default=[],
        metavar="NAME=VALUE,FLAG,...",
        help="options in mount-helper form, e.g. -o ro,allow_other,uid=1000",
    )
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--allow-other", action="store_true", help="let other users in")
    p.add_argument("--uid", type=int, help="owner of files (default: you)")
    p.add_argument("--gid", type=int, help="group of files (default: yours)")
    p.add_argument("--umask", type=lambda s: int(s, 8), help="octal (default 022)")
    p.add_argument("--cache-dir", help="local cache (default: the user cache dir)")
    p.add_argument(
        "--listing-ttl",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a directory listing is trusted (10)",
    )
    p.add_argument(
        "--attr-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long the kernel trusts attributes and names (1)",
    )
    p.add_argument(
        "--negative-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long the kernel trusts that a name does not exist (1)",
    )
    p.add_argument(
        "--key-sync-timeout",
        type=_optional_float,
        default=1.0,
        metavar="SECONDS",
        help="confirm each upload reads back, for at most this long; 0: no limit, "
        "'none': no check (1)",
    )
    p.add_argument("--threads", type=int, default=16, help="parallel S3 requests (16)")
    p.add_argument(
        "--io-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a read from S3 (GET, HEAD, LIST) that takes longer fails with EIO (60)",
    )
    p.add_argument(
        "--write-back",
        type=float,
        metavar="SECONDS",
        help="close() returns once the data is journaled on local disk; uploads "
        "start SECONDS later, in the background (default: upload at close)",
    )
    p.add_argument(
        "--part-size",
        type=int,
        default=16,
        metavar="MIB",
        help="multipart part size and threshold in MiB (16)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-file", help="daemon log (default: CACHE_DIR/s3mount.log)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run, needs_storage=False)

    p = sub.add_parser("unmount", parents=[common], help="upload dirty data, unmount, wait")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait (600)")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for journaled uploads: they finish at the next mount",
    )
    p.set_defaults(func=cmd_unmount, needs_storage=False)

    p = sub.add_parser(
        "sync", parents=[common], help="return once everything written to the mount is in S3"
    )
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_sync, needs_storage=False)

    p = sub.add_parser(
        "drop-cache",
        parents=[common],
        help="forget what a mount cached at and below PATH (after changes behind its back)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_drop_cache, needs_storage=False)

    p = sub.add_parser("status", parents=[common], help="requests, bytes, dirty files of a mount")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status, needs_storage=False)


def _optional_float(s: str) -> float | None:
    return None if s.lower() in ("none", "off") else float(s)


def apply_o_options(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    """Fold ``-o a=b,c`` into the same attributes the long options set."""
    for group in args.o:
        for item in group.split(","):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name in IGNORED_O or name.startswith("x-"):
                continue
            if not sep:
                if name not in FLAG_O:
                    raise MountUsageError(f"-o {item}: unknown flag")
                setattr(args, FLAG_O[name], True)
                continue
            if name not in parser_defaults or name in ("source", "mountpoint", "o"):
                raise MountUsageError(f"-o {item}: unknown option")
            conv = {"uid": int, "gid": int, "umask": lambda s: int(s, 8), "threads": int,
                    "part_size": int, "listing_ttl": float, "attr_timeout": float,
                    "negative_timeout": float, "key_sync_timeout": _optional_float,
                    "write_back": float, "io_timeout": float,
                    "retries": int}.get(name, str)  # fmt: skip
            try:
                setattr(args, name, conv(value))
            except ValueError:
                raise MountUsageError(f"-o {item}: bad value") from None


def parse_source(source: str) -> tuple[str, str]:
    bucket, _, prefix = source.partition(":")
    if not bucket:
        raise MountUsageError(f"{source!r}: expected BUCKET[:PREFIX]")
    return bucket, prefix.strip("/")


def default_cache_dir(bucket: str, prefix: str) -> str:
    tag = bucket + ("-" + hashlib.sha256(prefix.encode()).hexdigest()[:8] if prefix else "")
    return os.path.join(platformdirs.user_cache_dir("s3mount"), tag)


def transfer_settings(part_mib: int) -> TransferSettings:
    if part_mib < 5:
        raise MountUsageError("--part-size must be at least 5 (MiB), S3's minimum part size")
    return TransferSettings(multipart_threshold=part_mib * MiB, part_size=part_mib * MiB)


def daemonize(argv: list[str], log_file: str, timeout: float = 120) -> int:
    """Start ``s3mount ... --foreground`` detached; return once it reports the mount ready."""
    r, w = os.pipe()
    os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "s3mount", *argv, "--foreground", "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(w,),
            start_new_session=True,
        )
    os.close(w)
    deadline = time.monotonic() + timeout
    message = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([pipe], [], [], left)[0]:
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            message += chunk
            if message.startswith(READY):
                break
    if message.startswith(READY):
        return EXIT_OK
    text = message.decode(errors="replace").strip()
    if not text:
        alive = child.poll() is None
        text = f"the mount did not answer within {timeout:g}s" if alive else "the daemon exited"
        text += f" (see {log_file})"
    if child.poll() is None:
        child.terminate()
    print(f"s3mount: error: {text}", file=sys.stderr)
    return EXIT_FAILED


def read_status(mountpoint: str) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountUsageError(f"{mountpoint}: not on an s3mount mount") from None
        raise MountUsageError(f"{mountpoint}: {os.strerror(exc.errno or errno.EIO)}") from None
    return json.loads(raw)


def cmd_status(args: argparse.Namespace, _st: None) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"mount:     s3://{st['bucket']}/{st['prefix']} on {st['mountpoint']} (pid {st['pid']})")
    print(f"uptime:    {st['uptime']} s")
    total = sum(st["requests"].values())
    print(f"requests:  {total}")
    for name, n in sorted(st["requests"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24}{n}")
    print(f"bytes in:  {st['bytes_in']}   bytes out: {st['bytes_out']}")
    print(f"open files: {st['open_files']}   dirty: {st['dirty_files']} ({st['dirty_bytes']} B)")
    if st.get("write_back") is not None or st.get("pending_uploads"):
        print(
            f"pending uploads: {st['pending_uploads']} ({st['pending_bytes']} B), "
            f"{st['uploading']} in flight, {st['upload_failures']} failed tries"
        )
        if st.get("last_upload_error"):
            print(f"last upload error: {st['last_upload_error']}")
    for path in st.get("recovered", []):
        print(f"recovered (not uploaded): {path}")
    return EXIT_OK


def mount_root(path: str) -> str:
    """The mount point of the s3mount mount that holds ``path`` (else a usage error)."""
    p = os.path.realpath(path)
    while not os.path.ismount(p) and p != "/":
        p = os.path.dirname(p)
    read_status(p)  # raises unless p is an s3mount mount
    return p


def cmd_drop_cache(args: argparse.Namespace, _st: None) -> int:
    for path in args.paths:
        mount_root(path)
        try:
            os.setxattr(path, INVALIDATE_XATTR, b"1")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise MountUsageError(f"{path}: not on an s3mount mount") from None
            raise MountUsageError(f"{path}: {os.strerror(exc.errno or errno.EIO)}") from None
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, _st: None) -> int:
    read_status(args.mountpoint)
    try:
        os.getxattr(args.mountpoint, SYNC_XATTR)
    except OSError as exc:
        raise MountUsageError(
            f"{args.mountpoint}: some uploads failed: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    return EXIT_OK


def cmd_unmount(args: argparse.Namespace, _st: None) -> int:
    mnt = args.mountpoint
    pid = read_status(mnt)["pid"]
    if args.no_wait:
        os.setxattr(mnt, NO_WAIT_XATTR, b"1")
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        print(f"s3mount: error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return EXIT_OK
        time.sleep(0.05)
    print(
        f"s3mount: error: the daemon (pid {pid}) is still running after {args.timeout}s",
        file=sys.stderr,
    )
    return EXIT_FAILED


def setup_daemon_logging(level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s s3mount[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
