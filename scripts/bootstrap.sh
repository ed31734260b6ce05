#!/usr/bin/env bash
# Installs what s3mount needs on Debian/Ubuntu: fuse3 and the libfuse3 headers (apt, as root),
# a virtualenv in .venv, and the package with its test extras. Safe to run again.
# S3MOUNT_EXTRA_APT adds more apt packages (scripts/test.sh names the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt+=(libfuse3-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v gcc >/dev/null || need_apt+=(gcc)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
# for the tests of the deployment files: systemd-analyze verifies systemd/*, shellcheck checks
# docker/entrypoint.sh (the Dockerfile's linter, hadolint, comes from PyPI with the test extras)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v shellcheck >/dev/null || need_apt+=(shellcheck)
for extra in ${S3MOUNT_EXTRA_APT:-}; do
  dpkg -s "$extra" >/dev/null 2>&1 || need_apt+=("$extra")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: please install as root: apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import s3mount, pyfuse3, moto, pytest' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.installed
fi
