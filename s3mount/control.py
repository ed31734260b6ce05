"""How the CLI talks to a running mount daemon: read-only attributes on the mount's root."""

STATUS_XATTR = "user.s3mount.status"  # the daemon's status, as JSON
