#!/usr/bin/env bash
# Runs the whole test suite (installing what it needs first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
S3MOUNT_EXTRA_APT="${S3MOUNT_EXTRA_APT:-} rsync sqlite3 git s3fs rclone attr strace" bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --diff . | head -40; exit 1; }
exec .venv/bin/python -m pytest -q --durations=15 "$@"
