"""``s3mount install-helper``: make this installation reachable by mount(8) and systemd.

It links ``SBIN/mount.fuse.s3mount`` (where mount(8) looks for the helper of ``fuse.s3mount``)
to this installation's ``mount.fuse.s3mount`` script, and ``BIN/s3mount`` (the path the
shipped systemd units use) to its ``s3mount`` script.  Links are only ever replaced or removed
if they are symbolic links; a real file there is left alone.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

HELPER = "mount.fuse.s3mount"
COMMAND = "s3mount"


class InstallError(Exception):
    """The links cannot be made: one line for the user."""


@dataclass
class Link:
    path: str  # the link
    target: str  # what it points to


def scripts_dir() -> str:
    """Where this installation's console scripts are (the venv's bin, or /usr/local/bin)."""
    return sysconfig.get_path("scripts")


def planned_links(sbin_dir: str, bin_dir: str) -> list[Link]:
    scripts = scripts_dir()
    links = []
    for name, where in ((HELPER, sbin_dir), (COMMAND, bin_dir)):
        target = os.path.join(scripts, name)
        if not os.access(target, os.X_OK):
            raise InstallError(f"{target}: not found (is s3mount installed with pip?)")
        path = os.path.join(where, name)
        if os.path.realpath(path) == os.path.realpath(target) and not os.path.islink(path):
            continue  # the script itself is already there (pip installed into BIN)
        links.append(Link(path, target))
    return links


def install(sbin_dir: str = "/sbin", bin_dir: str = "/usr/local/bin") -> list[str]:
    """Make the links; returns one line per change, for the user."""
    done = []
    for link in planned_links(sbin_dir, bin_dir):
        if os.path.islink(link.path):
            if os.readlink(link.path) == link.target:
                done.append(f"{link.path} -> {link.target} (already there)")
                continue
            os.unlink(link.path)
        elif os.path.lexists(link.path):
            raise InstallError(f"{link.path}: exists and is not a link; not replaced")
        try:
            os.makedirs(os.path.dirname(link.path), exist_ok=True)
            os.symlink(link.target, link.path)
        except OSError as exc:
            raise InstallError(f"{link.path}: {exc.strerror}") from None
        done.append(f"{link.path} -> {link.target}")
    return done


def remove(sbin_dir: str = "/sbin", bin_dir: str = "/usr/local/bin") -> list[str]:
    """Remove the links that point to this installation."""
    done = []
    for link in planned_links(sbin_dir, bin_dir):
        if os.path.islink(link.path) and os.readlink(link.path) == link.target:
            try:
                os.unlink(link.path)
            except OSError as exc:
                raise InstallError(f"{link.path}: {exc.strerror}") from None
            done.append(f"removed {link.path}")
    return done
