"""The mount daemon's lifecycle: wire the layers, mount, serve, and shut down cleanly.

Every background task of the daemon is started and stopped here.  Shutdown (unmount by
``fusermount3 -u``/``s3mount unmount``, SIGTERM or SIGINT) uploads all dirty data before the
process exits.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pyfuse3
import trio

from s3mount import malloc
from s3mount.core.s3fs import S3FS
from s3mount.fuse_ops import MountOptions, Operations
from s3mount.metrics import ErrorCounter, serve_metrics
from s3mount.notify import notify
from s3mount.storage import ConnectionSettings, Storage, StorageError, TransferSettings

log = logging.getLogger(__name__)


class MountError(Exception):
    """The mount could not start; the message is one line for the user."""


@dataclass
class MountConfig:
    bucket: str
    mountpoint: str
    prefix: str = ""
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    cache_dir: str = ""
    cache_size: int = 0  # bytes of closed files' clean data kept on disk
    read_only: bool = False
    allow_other: bool = False
    options: MountOptions = field(default_factory=MountOptions)
    listing_ttl: float = 60.0
    metadata: str = "auto"  # how unknown objects get POSIX metadata (S3FS METADATA_MODES)
    key_sync_timeout: float | None = 1.0
    threads: int = 16
    write_back: float | None = None  # seconds before a journaled upload starts; None: off
    io_timeout: float = 60.0  # a read from S3 that takes longer gives EIO
    metrics_port: int | None = None  # serve Prometheus text on metrics_host:metrics_port
    metrics_host: str = "127.0.0.1"


def clear_stale_mount(mountpoint: str) -> None:
    """A dead FUSE daemon leaves 'Transport endpoint is not connected': unmount it.
    statvfs, because the kernel answers a stat from its attribute cache for a while after
    the daemon died, and always asks the daemon for statfs."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"{mountpoint}: {os.strerror(exc.errno or errno.EIO)}") from None
        log.warning("%s: clearing the stale mount of a dead daemon", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, capture_output=True)


def check_mountpoint(mountpoint: str) -> None:
    clear_stale_mount(mountpoint)
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint}: something is already mounted there")


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname=s3mount:{cfg.bucket}", "subtype=s3mount", "noatime"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.read_only:
        opts.add("ro")
    return opts


async def serve(cfg: MountConfig, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled; then upload dirty data and return."""
    check_mountpoint(cfg.mountpoint)
    malloc.tune()
    # A pooled connection for every thread that may send a request: the programs' and the
    # write-back uploads' (S3FS runs each on --threads threads).
    pool = max(cfg.connection.max_pool_connections, 2 * cfg.threads)
    connection = replace(cfg.connection, max_pool_connections=pool)
    storage = Storage(connection, default_bucket=cfg.bucket, transfer=cfg.transfer)
    try:
        if not await trio.to_thread.run_sync(storage.bucket_exists, cfg.bucket):
            raise MountError(f"bucket {cfg.bucket} does not exist")
    except StorageError as exc:
        raise MountError(str(exc)) from None
    fs = S3FS(
        cfg.bucket,
        cfg.prefix,
        storage,
        key_sync_timeout=cfg.key_sync_timeout,
        cache_dir=cfg.cache_dir,
        listing_ttl=cfg.listing_ttl,
        threads=cfg.threads,
        read_only=cfg.read_only,
        write_back=cfg.write_back,
        io_timeout=cfg.io_timeout,
        metadata=cfg.metadata,
        keep_bytes=cfg.cache_size,
    )
    started = time.time()
    errors = ErrorCounter()
    logging.getLogger("s3mount").addHandler(errors)

    def status() -> dict:
        counters = storage.counter.snapshot()
        return {
            "pid": os.getpid(),
            "bucket": cfg.bucket,
            "prefix": cfg.prefix,
            "mountpoint": cfg.mountpoint,
            "uptime": round(time.time() - started, 1),
            "requests": counters["requests"],
            "bytes_in": counters["bytes_in"],
            "bytes_out": counters["bytes_out"],
            "cache": dict(fs.stats),
            "open_files": len(fs.files.files),
            "dirty_files": sum(1 for f in fs.files.files.values() if f.dirty),
            "dirty_bytes": fs.files.dirty_bytes(),
            "kept_files": len(fs.files.kept),
            "kept_bytes": fs.files.kept_bytes,
            "cache_dir": cfg.cache_dir,
            "write_back": cfg.write_back,
            **fs.writeback.stats(),
            **fs.deletes.stats(),
            "recovered": list(fs.recovered),
            "errors": errors.count,
            "metrics": f"{cfg.metrics_host}:{cfg.metrics_port}" if cfg.metrics_port else None,
        }

    ops = Operations(fs, cfg.options, status=status)
    metrics_listeners = await _metrics_listeners(cfg)
    try:
        pyfuse3.init(ops, cfg.mountpoint, fuse_options(cfg))
    except RuntimeError as exc:
        for listener in metrics_listeners:
            listener.socket.close()
        raise MountError(f"{cfg.mountpoint}: cannot mount: {exc}") from None
    log.info("mounted s3://%s/%s on %s", cfg.bucket, cfg.prefix, cfg.mountpoint)
    _ignore_stop_signals()  # the watcher task takes them while we serve
    try:
        async with trio.open_nursery() as nursery:

            async def fuse_main() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()  # unmounted: stop the other tasks

            nursery.start_soon(fuse_main)
            nursery.start_soon(_stop_on_signals)
            nursery.start_soon(fs.writeback.run, fs.upload_record)
            nursery.start_soon(fs.deletes.run)
            nursery.start_soon(fs.files.keep_spares)
            nursery.start_soon(malloc.release_when_idle, storage.counter.bytes_moved)
            fs.background = nursery  # readahead fetches run here
            if metrics_listeners:
                nursery.start_soon(serve_metrics, metrics_listeners, status)
            st = await trio.to_thread.run_sync(os.stat, cfg.mountpoint)  # the mount answers
            _set_read_ahead(st.st_dev)
            on_ready()
    finally:
        notify("STOPPING=1", f"STATUS=unmounting {cfg.mountpoint}, uploading dirty data")
        logging.getLogger("s3mount").removeHandler(errors)
        with trio.CancelScope(shield=True):
            fs.background = None
            try:
                async with trio.open_nursery() as nursery:  # uploads go on while we drain
                    nursery.start_soon(fs.writeback.run, fs.upload_record)
                    nursery.start_soon(fs.deletes.run)
                    await fs.close(drain=not ops.no_wait)
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # already logged with the key; data kept locally
                log.error("some dirty data could not be uploaded at unmount: %s", exc)
            if fs.writeback.records:
                log.warning("%d uploads stay journaled for the next mount",
                            len(fs.writeback.records))  # fmt: skip
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", cfg.mountpoint)


READ_AHEAD_KB = 1024  # the largest read request the kernel sends us (256 pages)


def _set_read_ahead(dev: int) -> None:
    """Let the kernel read ahead 1 MiB at a time on this mount instead of its default
    128 KiB: a sequential read then comes in 1 MiB requests, a quarter of the calls.
    Needs root (sysfs); otherwise the default stays."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("kernel readahead stays at its default: %s", exc)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _ignore_stop_signals() -> None:
    """Ignore SIGTERM, SIGINT and SIGHUP except while the watcher task listens for them (it
    restores SIG_IGN when it ends), until the process exits: the uploads at shutdown are not
    cut short by a second signal, a service manager's stop waits for them, and the exit status
    stays 0. SIGKILL still ends the daemon (the journal then stays for the next mount)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


async def _metrics_listeners(cfg: MountConfig) -> list[trio.SocketListener]:
    """Bind the metrics port before mounting, so that a port in use is a clean error."""
    if not cfg.metrics_port:
        return []
    try:
        listeners = await trio.open_tcp_listeners(cfg.metrics_port, host=cfg.metrics_host)
    except OSError as exc:
        where = f"{cfg.metrics_host}:{cfg.metrics_port}"
        raise MountError(f"metrics endpoint {where}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s:%s/metrics", cfg.metrics_host, cfg.metrics_port)
    return listeners


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
