"""An embedded local S3 endpoint (moto's server) for trying s3mount without an AWS account.

Needs the ``local`` extra (``pip install s3mount[local]``).  Not for production: data lives in
memory and is gone when the server stops.
"""

from __future__ import annotations

import signal
import sys
import threading


def serve_forever(host: str, port: int) -> None:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print(
            "s3mount: error: the local server needs moto: pip install 's3mount[local]'",
            file=sys.stderr,
        )
        raise SystemExit(3) from None
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    print(
        f"local S3 endpoint on http://{host}:{port} (any access key works; Ctrl-C stops it)",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
