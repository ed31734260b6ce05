"""How the CLI talks to a running mount daemon: read-only attributes on the mount's root."""

import os

STATUS_XATTR = "user.s3mount.status"  # the daemon's status, as JSON
INVALIDATE_XATTR = "user.s3mount.invalidate"  # set on a path: drop what is cached below it
SYNC_XATTR = "user.s3mount.sync"  # read on the root: returns once everything is uploaded
NO_WAIT_XATTR = "user.s3mount.no-wait"  # set on the root: the next unmount leaves the journal

# Read-only facts about the object behind a path: attribute name -> ObjectInfo field
# ("s3.url" is a presigned GET URL, valid for an hour).
INFO_XATTRS = {
    "s3.etag": "etag",
    "s3.storage_class": "storage_class",
    "s3.version_id": "version_id",
    "s3.content_type": "content_type",
    "s3.url": "",
}


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs. An exited daemon stays a zombie until init reaps
    it, which some inits (containers, microVMs) do only every few seconds: that counts as
    gone, but only once every thread has exited (the main thread can be a zombie while the
    others still hold the /dev/fuse descriptor)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):  # exited meanwhile
            continue
        if state not in (b"Z", b"X"):
            return True
    return False
