#!/bin/sh
# The container's entrypoint: s3mount in the foreground, as the container's main process, so
# that `docker stop` (SIGTERM) uploads dirty data and unmounts. See docs/docker.md.
#
#   (no arguments)                    mount $S3MOUNT_BUCKET[:$S3MOUNT_PREFIX] on $S3MOUNT_MOUNTPOINT
#   BUCKET[:PREFIX]|NAME [MNT] [OPT]  mount that bucket, or the config file's mount NAME
#   -o ro --listing-ttl 30 ...        options only: mount from the environment, with them
#   status /mnt/s3, list, ...         any other s3mount command, as is
set -eu

export S3MOUNT_FOREGROUND=1
if [ -n "${S3MOUNT_MOUNTPOINT:-}" ]; then
  mkdir -p -- "$S3MOUNT_MOUNTPOINT"
fi
if [ $# -eq 0 ]; then
  set -- mount
fi
case "$1" in
  -*) set -- mount "$@" ;;
esac
exec s3mount "$@"
