"""systemd's readiness protocol (sd_notify) and journald detection, with the standard library.

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract socket
when it starts with ``@``); without the variable it does nothing.  A failure to send is
ignored: readiness notification must never stop a mount.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

NOTIFY_ENV = "NOTIFY_SOCKET"
JOURNAL_ENV = "JOURNAL_STREAM"


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to systemd; True if sent."""
    address = os.environ.get(NOTIFY_ENV)
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False


def stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected (``$JOURNAL_STREAM``)."""
    value = os.environ.get(JOURNAL_ENV, "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError, AttributeError):
        return False


# syslog priorities, which journald reads from a "<N>" prefix of each line
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """``<N>name: message``: journald adds the time, the pid and the unit itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record).replace("\n", "\n" + f"<{priority}>")
        return f"<{priority}>{text}"
