"""``mount.fuse.s3mount``: the program mount(8) runs for ``mount -t fuse.s3mount`` and for
``/etc/fstab`` lines (and so for systemd ``.mount`` units).

mount(8) calls it as ``mount.fuse.s3mount SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]``;
it becomes ``s3mount mount SOURCE MOUNTPOINT -o OPTIONS``, which returns once the mount
answers.  ``s3mount install-helper`` links it into /sbin, where mount(8) looks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: mount.fuse.s3mount BUCKET[:PREFIX]|NAME MOUNTPOINT [-sfnv] [-o OPTIONS]"


def translate(argv: Sequence[str]) -> tuple[list[str] | None, bool]:
    """mount(8)'s helper arguments as ``s3mount`` arguments (None: nothing to do, for ``-f``),
    and whether ``-v`` asked for the command to be shown."""
    positional: list[str] = []
    options: list[str] = []
    fake = verbose = False
    it = iter(argv)
    for arg in it:
        if arg in ("-o", "-t"):
            value = next(it, None)
            if value is None:
                raise ValueError(f"{arg} needs a value")
            if arg == "-o":
                options.append(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvhi"):
            if "h" in arg:
                raise ValueError("help")
            fake = fake or "f" in arg  # -f: "fake", do everything but the mount itself
            verbose = verbose or "v" in arg
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ValueError("expected a source and a mount point")
    if fake:
        return None, verbose
    out = ["mount", *positional]
    for o in options:
        out += ["-o", o]
    return out, verbose


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, verbose = translate(argv)
    except ValueError as exc:
        print(USAGE, file=sys.stderr)
        if str(exc) != "help":
            print(f"mount.fuse.s3mount: error: {exc}", file=sys.stderr)
        return 2
    if args is None:
        return 0
    if verbose:
        print("s3mount " + " ".join(args), file=sys.stderr)
    from s3mount.cli import main as s3mount_main

    return s3mount_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
