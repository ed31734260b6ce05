#!/usr/bin/env bash
# The main job on an embedded local S3 endpoint (no AWS account needed): starts a local S3
# server, creates a bucket, runs the bucket/object commands, then mounts the bucket and works
# in it with ordinary programs. Everything is cleaned up at the end (or on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo-secret AWS_DEFAULT_REGION=us-east-1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" S3MOUNT_BUCKET=demo-bucket
work=$(mktemp -d)
mnt="$work/mnt"

s3mount local-server --port "$port" >"$work/server.log" 2>&1 &
server=$!
cleanup() {
  if mountpoint -q "$mnt" 2>/dev/null; then s3mount unmount "$mnt" || fusermount3 -u -z "$mnt"; fi
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done

run() { echo "\$ $*"; "$@"; }
echo "== local S3 endpoint at $AWS_ENDPOINT_URL, bucket $S3MOUNT_BUCKET"
run s3mount create-bucket
echo "hello from s3mount" >"$work/hello.txt"
head -c 3000000 /dev/urandom >"$work/random.bin"
run s3mount put "$work/hello.txt"
run s3mount put "$work/random.bin" data/random.bin --metadata origin=demo
run s3mount list
run s3mount list data/random.bin
run s3mount get hello.txt "$work/hello-back.txt"
run cat "$work/hello-back.txt"
run s3mount copy hello.txt copies/hello.txt
run s3mount exists copies/hello.txt && echo "(exists)"
run s3mount url hello.txt --expires 300
run s3mount list-buckets

if s3mount mount --help >/dev/null 2>&1; then
  mkdir -p "$mnt"
  echo "== mounting s3://$S3MOUNT_BUCKET on $mnt"
  run s3mount "$S3MOUNT_BUCKET" "$mnt"
  run ls -l "$mnt" "$mnt/data"
  run cat "$mnt/hello.txt"
  run cp "$work/random.bin" "$mnt/data/copy.bin"
  run cmp "$work/random.bin" "$mnt/data/copy.bin" && echo "(same bytes)"
  run mkdir -p "$mnt/notes/2026"
  echo "written through the mount" >"$mnt/notes/2026/today.txt"
  run mv "$mnt/notes" "$mnt/archive"
  run find "$mnt" -type f
  run s3mount status "$mnt"
  run s3mount unmount "$mnt"
  echo "== after unmounting, the objects are in the bucket:"
  run s3mount list
fi
echo "== demo finished"
