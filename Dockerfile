# s3mount in a container: a FUSE mount of an S3 bucket, in the foreground.
#
#   docker build -t s3mount .
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN \
#       -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e S3MOUNT_BUCKET=mybucket s3mount
#
# See docs/docker.md (options, credentials, sharing the mount, Kubernetes).

ARG PYTHON_VERSION=3.11

# pyfuse3 is built from source: it needs a compiler and the libfuse3 headers.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libfuse3-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY s3mount ./s3mount
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-bookworm
# fuse3: fusermount3 and /etc/fuse.conf; the runtime library comes with it
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && mkdir -p /mnt/s3 /var/cache/s3mount /etc/s3mount
COPY docker/entrypoint.sh /usr/local/bin/s3mount-entrypoint

# Config file: /etc/s3mount/config.toml; cache, journal and unsaved data:
# /var/cache/s3mount/BUCKET (keep it on a volume so that a restart finishes pending uploads).
ENV XDG_CACHE_HOME=/var/cache \
    S3MOUNT_MOUNTPOINT=/mnt/s3
VOLUME ["/var/cache/s3mount"]
# `docker stop` sends SIGTERM: s3mount uploads dirty data, then unmounts and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/s3mount-entrypoint"]
CMD []
