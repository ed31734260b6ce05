"""The bucket and object commands (the seed ``s3`` tool's commands, and more).

Each ``cmd_*`` function takes the parsed arguments and a :class:`Storage`, prints its result
on stdout and returns the exit status.  Errors are raised as ``StorageError`` and turned into
one line on stderr by :mod:`s3mount.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime

from s3mount.storage import (
    BucketNotFound,
    InvalidName,
    LocalFileError,
    NotFound,
    ObjectInfo,
    S3Key,
    S3Name,
    Storage,
    WriteOptions,
)

EXIT_OK = 0
EXIT_NO = 1  # a negative answer: `exists` found nothing, `list-buckets NAME` NOT FOUND
EXIT_USAGE = 2
EXIT_FAILED = 3


def remote(name: str, bucket: str | None) -> S3Name:
    """``s3://bucket/key`` names any bucket; a bare key is in ``--bucket`` or the default."""
    if name.startswith("s3://"):
        b, _, k = name[5:].partition("/")
        if not b or not k:
            raise InvalidName(f"{name}: expected s3://BUCKET/KEY")
        return S3Name(k, b)
    if not name:
        raise InvalidName("empty key")
    return S3Name(name, bucket)


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise InvalidName(f"{p!r}: {what} must be NAME=VALUE")
        out[k] = v
    return out


def _time(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on a terminal; nothing when stdout is piped or redirected."""
    if not sys.stdout.isatty() or total <= 0:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
        yield bar.update


# -- buckets ---------------------------------------------------------------------------------


def cmd_create_bucket(args: argparse.Namespace, st: Storage) -> int:
    st.bucket_create(args.bucket_name or args.bucket, region=args.bucket_region)
    return EXIT_OK


def cmd_delete_bucket(args: argparse.Namespace, st: Storage) -> int:
    n = st.bucket_delete(args.bucket_name or args.bucket, force=args.force)
    if args.force and n:
        print(f"deleted {n} objects and versions", file=sys.stderr)
    return EXIT_OK


def cmd_list_buckets(args: argparse.Namespace, st: Storage) -> int:
    buckets = list(st.bucket_list())
    if args.bucket_name:
        buckets = [b for b in buckets if b.name == args.bucket_name]
        if not buckets:
            print(f"{args.bucket_name} NOT FOUND")
            return EXIT_NO
    for b in buckets:
        print(f"{_time(b.creation_date)}  {b.name}")
    return EXIT_OK


def cmd_configure_bucket(args: argparse.Namespace, st: Storage) -> int:
    bucket = args.bucket_name or args.bucket
    tags = parse_pairs(args.tag, "a tag") if args.tag else ({} if args.clear_tags else None)
    st.bucket_configure(
        bucket,
        versioning=None if args.versioning is None else args.versioning == "on",
        tags=tags,
        block_public_access=None if args.block_public is None else args.block_public == "on",
    )
    conf = st.bucket_configuration(bucket)
    print(f"versioning: {conf['versioning']}")
    for k, v in sorted(conf["tags"].items()):
        print(f"tag: {k}={v}")
    return EXIT_OK


# -- objects ---------------------------------------------------------------------------------


def print_info(info: ObjectInfo) -> None:
    print(f"key: {info.key}")
    print(f"size: {info.size}")
    print(f"last-modified: {_time(info.last_modified)}")
    print(f"etag: {info.etag}")
    print(f"content-type: {info.content_type}")
    print(f"storage-class: {info.storage_class}")
    if info.version_id:
        print(f"version-id: {info.version_id}")
    for k, v in sorted(info.metadata.items()):
        print(f"meta: {k}={v}")


def cmd_list(args: argparse.Namespace, st: Storage) -> int:
    if args.list_file:
        name = remote(args.list_file, args.bucket)
        print_info(st.head(name))
        return EXIT_OK
    for item in st.bucket_list_keys(
        args.bucket, delimiter="/" if args.dirs else None, prefix=args.prefix
    ):
        if isinstance(item, S3Key):
            print(f"{_time(item.last_modified)}  {item.size:>12}  {item.key}")
        else:
            print(f"{'PRE':>33}  {item}")
    return EXIT_OK


def _write_options(args: argparse.Namespace) -> WriteOptions:
    return WriteOptions(
        content_type=args.content_type,
        metadata=parse_pairs(args.metadata, "metadata"),
        storage_class=args.storage_class,
        sse=args.sse,
        sse_kms_key_id=args.sse_kms_key_id,
    )


def _put_one(st: Storage, local: str, name: S3Name, options: WriteOptions) -> ObjectInfo:
    try:
        size = os.path.getsize(local)
    except OSError as exc:
        raise LocalFileError(
            f"put {local}: {os.strerror(exc.errno or 5)}", exc.errno or 5
        ) from None
    with progress_bar(size, os.path.basename(local)) as bar:
        return st.write(local, name, options, progress=bar)


def cmd_put(args: argparse.Namespace, st: Storage) -> int:
    options = _write_options(args)
    src = args.local_src
    if os.path.isdir(src):
        if not args.recursive:
            raise LocalFileError(f"put {src}: is a directory (use --recursive)", 21)
        base = (
            args.remote_dst
            if args.remote_dst is not None
            else os.path.basename(os.path.normpath(src))
        )
        prefix = remote(base.rstrip("/") + "/", args.bucket) if base else S3Name("", args.bucket)
        jobs = []
        for root, _dirs, files in os.walk(src):
            for f in files:
                path = os.path.join(root, f)
                rel = os.path.relpath(path, src).replace(os.sep, "/")
                jobs.append((path, S3Name(prefix.key + rel, prefix.bucket)))
        _parallel(lambda j: st.write(j[0], j[1], options), jobs)
        print(f"uploaded {len(jobs)} files", file=sys.stderr)
        return EXIT_OK
    dst = args.remote_dst or os.path.basename(src)
    _put_one(st, src, remote(dst, args.bucket), options)
    return EXIT_OK


def cmd_get(args: argparse.Namespace, st: Storage) -> int:
    if args.recursive:
        prefix = remote(args.remote_src.rstrip("/") + "/", args.bucket)
        dest = args.local_dst or os.path.basename(args.remote_src.rstrip("/"))
        jobs = []
        for item in st.bucket_list_keys(prefix.bucket, prefix=prefix.key):
            assert isinstance(item, S3Key)
            rel = item.key[len(prefix.key) :]
            if not rel or rel.endswith("/"):
                continue  # directory markers
            if any(part in ("", ".", "..") for part in rel.split("/")):
                print(f"skipped {item.key}: not a safe local path", file=sys.stderr)
                continue
            jobs.append((S3Name(item.key, prefix.bucket), os.path.join(dest, *rel.split("/"))))
        if not jobs:
            raise NotFound(f"get {args.remote_src}: no keys under this prefix")

        def fetch(job: tuple[S3Name, str]) -> None:
            os.makedirs(os.path.dirname(job[1]) or ".", exist_ok=True)
            st.read(job[0], job[1])

        _parallel(fetch, jobs)
        print(f"downloaded {len(jobs)} files", file=sys.stderr)
        return EXIT_OK
    name = remote(args.remote_src, args.bucket)
    dst = args.local_dst or os.path.basename(name.key)
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(name.key))
    info = st.head(name)
    with progress_bar(info.size, os.path.basename(name.key)) as bar:
        st.read(name, dst, progress=bar)
    return EXIT_OK


def _parallel(fn: Callable, jobs: list, workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(fn, jobs):
            pass


def cmd_delete(args: argparse.Namespace, st: Storage) -> int:
    names = [remote(k, args.bucket) for k in args.delete_file]
    if len(names) == 1:
        st.delete(names[0])
        return EXIT_OK
    by_bucket: dict[str | None, list[str]] = {}
    for n in names:
        by_bucket.setdefault(n.bucket, []).append(n.key)
    for bucket, keys in by_bucket.items():
        st.delete_many(keys, bucket)
    return EXIT_OK


def cmd_copy(args: argparse.Namespace, st: Storage) -> int:
    st.copy(remote(args.src, args.bucket), remote(args.dst, args.bucket))
    return EXIT_OK


def cmd_update_metadata(args: argparse.Namespace, st: Storage) -> int:
    info = st.update_metadata(
        remote(args.key, args.bucket),
        parse_pairs(args.pairs, "metadata"),
        replace=args.replace,
        content_type=args.content_type,
    )
    print_info(info)
    return EXIT_OK


def cmd_exists(args: argparse.Namespace, st: Storage) -> int:
    name = remote(args.key, args.bucket)
    found, _info = st.exists(name)
    if not found and not st.bucket_exists(name.bucket):
        # A HEAD of a key can't tell a missing key from a missing bucket: ask the bucket.
        raise BucketNotFound(f"s3://{name.bucket or st.default_bucket}: bucket does not exist")
    return EXIT_OK if found else EXIT_NO


def cmd_url(args: argparse.Namespace, st: Storage) -> int:
    print(st.presigned_url(remote(args.key, args.bucket), args.expires, args.method))
    return EXIT_OK


def cmd_make_public(args: argparse.Namespace, st: Storage) -> int:
    st.make_public(remote(args.key, args.bucket))
    return EXIT_OK


def add_object_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the bucket and object commands on the CLI's subparsers."""

    def cmd(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=fn, needs_storage=True)
        return p

    p = cmd("create-bucket", cmd_create_bucket, "create a bucket (default: the default bucket)")
    p.add_argument("bucket_name", nargs="?")
    p.add_argument(
        "--bucket-region", metavar="REGION", help="region constraint (default: --region)"
    )

    p = cmd("delete-bucket", cmd_delete_bucket, "delete a bucket (default: the default bucket)")
    p.add_argument("bucket_name", nargs="?")
    p.add_argument(
        "--force", action="store_true", help="first delete every object, version and upload"
    )

    p = cmd("list-buckets", cmd_list_buckets, "list all buckets, or one")
    p.add_argument("bucket_name", nargs="?")

    p = cmd("configure-bucket", cmd_configure_bucket, "set versioning, tags, public access")
    p.add_argument("bucket_name", nargs="?")
    p.add_argument("--versioning", choices=["on", "off"])
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clear-tags", action="store_true", help="remove all tags")
    p.add_argument("--block-public", choices=["on", "off"], help="the bucket's public access block")

    p = cmd("list", cmd_list, "list all keys, or one key with its metadata")
    p.add_argument("list_file", nargs="?")
    p.add_argument("--prefix", default="", help="only keys under this prefix")
    p.add_argument("--dirs", action="store_true", help="one level only: keys, then common prefixes")

    p = cmd("put", cmd_put, "upload a local file (or a directory with --recursive)")
    p.add_argument("local_src")
    p.add_argument("remote_dst", nargs="?")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("--content-type", help="default: guessed from the name")
    p.add_argument("--metadata", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--storage-class", help="e.g. STANDARD_IA, GLACIER_IR")
    p.add_argument("--sse", choices=["AES256", "aws:kms"], help="server-side encryption")
    p.add_argument("--sse-kms-key-id", metavar="KEY_ID")

    p = cmd("get", cmd_get, "download a key (or a prefix with --recursive)")
    p.add_argument("remote_src")
    p.add_argument("local_dst", nargs="?")
    p.add_argument("-r", "--recursive", action="store_true")

    p = cmd("delete", cmd_delete, "delete one or more keys")
    p.add_argument("delete_file", nargs="+")

    p = cmd("copy", cmd_copy, "server-side copy (s3://BUCKET/KEY names another bucket)")
    p.add_argument("src")
    p.add_argument("dst")

    p = cmd("update-metadata", cmd_update_metadata, "set user metadata of a key in place")
    p.add_argument("key")
    p.add_argument("pairs", nargs="+", metavar="NAME=VALUE")
    p.add_argument("--replace", action="store_true", help="drop the metadata not given")
    p.add_argument("--content-type", help="also change the content type")

    p = cmd("exists", cmd_exists, "exit 0 when the key exists, 1 when it does not")
    p.add_argument("key")

    p = cmd("url", cmd_url, "print a presigned URL for the key")
    p.add_argument("key")
    p.add_argument("--expires", type=int, default=3600, metavar="SECONDS")
    p.add_argument("--method", choices=["GET", "PUT"], default="GET")

    p = cmd("make-public", cmd_make_public, "make a key readable by anyone (public-read ACL)")
    p.add_argument("key")
