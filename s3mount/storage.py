"""The storage layer: the only module of s3mount that talks to S3 (and imports boto3).

Everything here is blocking and thread-safe (boto3 clients are); the async layers above call it
through ``trio.to_thread.run_sync`` under a ``CapacityLimiter``.  Every failure leaves this
module as a :class:`StorageError` subclass that carries the errno a file system should report
and a one-line message that never contains credentials.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mimetypes
import os
import random
import re
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from typing import IO, Any
from urllib.parse import urlsplit

# boto3 and botocore are imported where a client is made or an error classified, not here:
# they take a quarter second to import, and `s3mount status` or `unmount` never need them.

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
SMALL_BODY = 1 * MiB  # PUTs up to this size go without "Expect: 100-continue"
GiB = 1024 * MiB
TiB = 1024 * GiB


class S3Facts:
    """Constants of S3 itself."""

    maximum_part_number = 10_000
    minimum_part_size = 5 * MiB
    maximum_part_size = 5 * GiB
    maximum_object_size = 5 * TiB
    maximum_single_copy_size = 5 * GiB
    maximum_key_length = 1024
    delete_batch_size = 1000


# ---------------------------------------------------------------------------------------------
# Errors


class StorageError(Exception):
    """A failed storage operation.  ``errno`` is what a file system should report for it."""

    errno = errno.EIO

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


class NotFound(StorageError):
    errno = errno.ENOENT


class BucketNotFound(NotFound):
    pass


class AccessDenied(StorageError):
    errno = errno.EACCES


class BadCredentials(AccessDenied):
    pass


class BucketNotEmpty(StorageError):
    errno = errno.ENOTEMPTY


class BucketExists(StorageError):
    errno = errno.EEXIST


class InvalidName(StorageError):
    errno = errno.EINVAL


class KeyTooLong(InvalidName):
    errno = errno.ENAMETOOLONG


class PreconditionFailed(StorageError):
    """The object changed (ETag no longer matches)."""

    errno = errno.ESTALE


class Unreachable(StorageError):
    """The endpoint could not be reached, or kept failing past the retry budget."""

    errno = errno.EIO


class LocalFileError(StorageError):
    """A local file could not be read or written; errno is the OS's."""

    def __init__(self, message: str, os_errno: int):
        super().__init__(message)
        self.errno = os_errno


_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchVersion", "NoSuchUpload"}
_ACCESS_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}


def _classify(exc: Exception, what: str) -> StorageError:
    """Turn any boto/botocore/OS exception into a StorageError with a one-line message."""
    import botocore.exceptions as bexc

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message") or code or f"HTTP {status}"
        text = f"{what}: {message}" + (f" ({code})" if code and code not in message else "")
        if code == "NoSuchBucket":
            return BucketNotFound(f"{what}: bucket does not exist", code=code)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{what}: not found", code=code)
        if code in _CREDENTIAL_CODES:
            return BadCredentials(f"{what}: credentials rejected ({code})", code=code)
        if code in _ACCESS_CODES or status == 403:
            return AccessDenied(f"{what}: access denied", code=code)
        if code == "BucketNotEmpty":
            return BucketNotEmpty(f"{what}: bucket is not empty", code=code)
        if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return BucketExists(f"{what}: bucket already exists", code=code)
        if code in ("InvalidBucketName", "InvalidArgument", "KeyTooLongError"):
            cls = KeyTooLong if code == "KeyTooLongError" else InvalidName
            return cls(text, code=code)
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailed(f"{what}: object changed on the server", code=code)
        if status is not None and status >= 500 or code in ("SlowDown", "Throttling"):
            return Unreachable(f"{what}: server kept failing: {message}", code=code)
        return StorageError(text, code=code)
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return BadCredentials(f"{what}: no AWS credentials found (see docs/cli.md)")
    if isinstance(exc, bexc.ProfileNotFound):
        return BadCredentials(f"{what}: {exc}")
    if isinstance(exc, bexc.ParamValidationError):
        return InvalidName(f"{what}: {str(exc).splitlines()[-1].strip()}")
    if isinstance(exc, bexc.EndpointConnectionError | bexc.ConnectionClosedError):
        url = urlsplit(str(exc.kwargs.get("endpoint_url", "")))
        where = f"{url.scheme}://{url.netloc}" if url.netloc else ""
        return Unreachable(f"{what}: cannot reach the S3 endpoint {where}".rstrip())
    if isinstance(exc, bexc.ConnectTimeoutError | bexc.ReadTimeoutError):
        return Unreachable(f"{what}: the S3 endpoint timed out")
    if isinstance(exc, bexc.BotoCoreError):
        return Unreachable(f"{what}: {exc}")
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return LocalFileError(f"{what}: {os.strerror(exc.errno)}{where}", exc.errno)
    # s3transfer wraps client errors in its own exceptions; look at the cause.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return _classify(cause, what)
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried.

    botocore's "standard" retry conditions decide *which* failures are retried (throttling and
    SlowDown, 500/502/503/504, connection resets, timeouts); we supply the attempt count and
    the backoff: ``random(0, 1) * min(base_delay * 2**(attempt-1), max_delay)``.
    """

    attempts: int = 5  # total attempts, the first one included
    base_delay: float = 0.1
    max_delay: float = 20.0


@dataclass(frozen=True)
class ConnectionSettings:
    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL / the profile's endpoint_url
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    path_style: bool = False
    tls: bool = True  # used when the endpoint URL has no scheme
    verify: bool | str = True  # False: don't check certificates; str: CA bundle path
    retry: RetryPolicy = RetryPolicy()
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 32


@dataclass(frozen=True)
class TransferSettings:
    multipart_threshold: int = 16 * MiB
    part_size: int = 16 * MiB
    max_concurrency: int = 8
    copy_threshold: int = S3Facts.maximum_single_copy_size

    def part_size_for(self, size: int) -> int:
        """The part size to use for an object of ``size`` bytes (grown to fit 10,000 parts)."""
        part = max(self.part_size, S3Facts.minimum_part_size)
        while part * S3Facts.maximum_part_number < size:
            part *= 2
        return part


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class S3Name:
    """A bucket plus a key.  A bare string key addresses the storage's default bucket."""

    key: str
    bucket: str | None = None

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.bucket else self.key


@dataclass(frozen=True)
class S3Owner:
    id: str = ""
    display_name: str = ""


@dataclass(frozen=True)
class S3Bucket:
    name: str
    creation_date: datetime | None = None


@dataclass(frozen=True)
class S3Key:
    """One entry of a listing (the <Contents> of ListObjectsV2)."""

    key: str
    size: int
    last_modified: datetime
    etag: str
    storage_class: str = "STANDARD"
    owner: S3Owner | None = None


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD (or a GET) tells about an object."""

    key: str
    size: int
    last_modified: datetime
    etag: str
    content_type: str = ""
    storage_class: str = "STANDARD"
    version_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (x-amz-meta-*)

    @classmethod
    def from_response(cls, key: str, r: dict[str, Any]) -> ObjectInfo:
        return cls(
            key=key,
            size=int(r.get("ContentLength", 0)),
            last_modified=r.get("LastModified") or datetime.fromtimestamp(0),
            etag=str(r.get("ETag", "")).strip('"'),
            content_type=r.get("ContentType", ""),
            storage_class=r.get("StorageClass") or "STANDARD",
            version_id=r.get("VersionId"),
            metadata=dict(r.get("Metadata") or {}),
        )


@dataclass(frozen=True)
class WriteOptions:
    """How an object is written: type, user metadata, storage class and encryption."""

    content_type: str | None = None  # None: guessed from the key's name
    metadata: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None
    sse: str | None = None  # "AES256" (SSE-S3) or "aws:kms"
    sse_kms_key_id: str | None = None
    if_match: str | None = None  # only write when the current ETag is this one
    if_none_match: bool = False  # only write when the key does not exist yet

    def extra_args(self, key: str) -> dict[str, Any]:
        ctype = self.content_type or guess_content_type(key)
        extra: dict[str, Any] = {"ContentType": ctype, "Metadata": dict(self.metadata)}
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.sse_kms_key_id
        return extra


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_bucket_name(name: str) -> None:
    """Refuse names S3 will not create: 3-63 lowercase letters, digits, '.', '-'."""
    if not _BUCKET_NAME.match(name) or ".." in name or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        raise InvalidName(
            f"{name!r} is not a valid bucket name (3-63 characters: lowercase letters, "
            "digits, '.' and '-', starting and ending with a letter or digit)"
        )


def guess_content_type(key: str) -> str:
    if key.endswith("/"):
        return "application/x-directory"
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


# ---------------------------------------------------------------------------------------------
# Retry handler built from botocore's standard pieces


class _ScaledBackoff:
    """Full-jitter exponential backoff, capped (botocore's BaseRetryBackoff interface)."""

    def __init__(self, policy: RetryPolicy):
        self._policy = policy

    def delay_amount(self, context: Any) -> float:
        exp = self._policy.base_delay * 2 ** (context.attempt_number - 1)
        return random.random() * min(exp, self._policy.max_delay)


class _NoQuota:
    """Retry budget without the shared token bucket: every request gets its own attempts."""

    def acquire_retry_quota(self, context: Any) -> bool:
        return True

    def release_retry_quota(self, context: Any, http_response: Any, **kwargs: Any) -> None:
        pass


def _install_retry_policy(client: Any, policy: RetryPolicy) -> None:
    from botocore.retries import standard as std_retries

    events = client.meta.events
    events.unregister("needs-retry.s3", unique_id="retry-config-s3")
    handler = std_retries.RetryHandler(
        retry_policy=std_retries.RetryPolicy(
            retry_checker=std_retries.StandardRetryConditions(max_attempts=policy.attempts),
            retry_backoff=_ScaledBackoff(policy),
        ),
        retry_event_adapter=std_retries.RetryEventAdapter(),
        retry_quota=_NoQuota(),
    )
    events.register("needs-retry.s3", handler.needs_retry, unique_id="retry-config-s3")


class RequestCounter:
    """Counts HTTP requests sent (retries included), by S3 operation name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0

    def _before_send(self, request: Any, **kwargs: Any) -> None:
        name = kwargs.get("event_name", "").rsplit(".", 1)[-1] or "Unknown"
        with self._lock:
            self.requests[name] += 1

    def add_bytes(self, n: int, outgoing: bool) -> None:
        with self._lock:
            if outgoing:
                self.bytes_out += n
            else:
                self.bytes_in += n

    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
            }


ProgressCallback = Callable[[int], None]
Part = dict[str, Any]  # a part of a multipart upload: number, ETag, checksum


def _part(number: int, answer: dict[str, Any]) -> Part:
    """What completing the upload needs of part ``number``, from S3's answer to it."""
    part = {"PartNumber": number, "ETag": answer["ETag"]}
    if "ChecksumCRC32" in answer:
        part["ChecksumCRC32"] = answer["ChecksumCRC32"]
    return part


# ---------------------------------------------------------------------------------------------
# Storage


class Storage:
    """Blocking S3 operations on a default bucket (or the bucket an :class:`S3Name` names)."""

    def __init__(
        self,
        settings: ConnectionSettings | None = None,
        default_bucket: str | None = None,
        transfer: TransferSettings | None = None,
    ):
        self.settings = settings or ConnectionSettings()
        self.default_bucket = default_bucket
        self.transfer = transfer or TransferSettings()
        self.counter = RequestCounter()
        self._client = self._make_client()

    # -- connection -------------------------------------------------------------------------

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        s = self.settings
        try:
            session = boto3.session.Session(
                profile_name=s.profile,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token,
                region_name=s.region,
            )
            endpoint = s.endpoint_url
            if endpoint and "://" not in endpoint:
                endpoint = ("https://" if s.tls else "http://") + endpoint
            verify: bool | str | None = s.verify
            if verify is True and endpoint and endpoint.startswith("http://"):
                verify = None  # a plain-http endpoint never needs a CA bundle
            config = Config(
                retries={"mode": "standard", "max_attempts": s.retry.attempts},
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                max_pool_connections=s.max_pool_connections,
                s3={"addressing_style": "path" if s.path_style else "auto"},
                signature_version="s3v4",
                # A fixed User-Agent: botocore otherwise rebuilds its long default one twice
                # per request, and checks every request's parameters against the model (our
                # requests are built by this module): together 10-15% of a small PUT's CPU.
                user_agent=_user_agent(),
                parameter_validation=False,
            )
            kwargs: dict[str, Any] = {"config": config, "use_ssl": s.tls}
            if endpoint:
                kwargs["endpoint_url"] = endpoint
            if verify is False or isinstance(verify, str):
                kwargs["verify"] = verify
            elif verify is None:
                # boto3 reads AWS_CA_BUNDLE even for http endpoints; a stale bundle path must
                # not break a local plain-http endpoint.
                kwargs["verify"] = False
            client = session.client("s3", **kwargs)
        except Exception as exc:  # profile not found, bad endpoint URL, ...
            raise _classify(exc, "connect") from None
        _install_retry_policy(client, s.retry)
        client.meta.events.register("before-send.s3", self.counter._before_send)
        client.meta.events.register_last("before-call.s3", _no_expect_for_small_bodies)
        return client

    @property
    def client(self) -> Any:
        return self._client

    def _where(self, name: S3Name | str) -> tuple[str, str]:
        if isinstance(name, S3Name):
            bucket, key = name.bucket or self.default_bucket, name.key
        else:
            bucket, key = self.default_bucket, name
        if not bucket:
            raise InvalidName("no bucket given (use --bucket or S3MOUNT_BUCKET)")
        if len(key.encode("utf-8", "surrogateescape")) > S3Facts.maximum_key_length:
            raise KeyTooLong(f"{key[:40]}...: key longer than 1024 bytes")
        return bucket, key

    def _bucket(self, bucket: str | None) -> str:
        b = bucket or self.default_bucket
        if not b:
            raise InvalidName("no bucket given (use --bucket or S3MOUNT_BUCKET)")
        return b

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            raise _classify(exc, what) from None

    def _transfer_config(self, size: int | None = None) -> Any:
        from boto3.s3.transfer import TransferConfig

        t = self.transfer
        part = t.part_size_for(size or 0)
        return TransferConfig(
            multipart_threshold=t.multipart_threshold,
            multipart_chunksize=part,
            max_concurrency=t.max_concurrency,
            use_threads=t.max_concurrency > 1,
        )

    # -- buckets ----------------------------------------------------------------------------

    def bucket_list(self) -> Iterator[S3Bucket]:
        r = self._call("list buckets", self._client.list_buckets)
        for b in r.get("Buckets", []):
            yield S3Bucket(name=b["Name"], creation_date=b.get("CreationDate"))

    def bucket_exists(self, bucket: str | None = None) -> bool:
        b = self._bucket(bucket)
        try:
            self._call(b, self._client.head_bucket, Bucket=b)
        except NotFound:
            return False
        return True

    def bucket_create(self, bucket: str | None = None, region: str | None = None) -> None:
        b = self._bucket(bucket)
        check_bucket_name(b)
        region = region or self.settings.region or self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": b}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        self._call(f"create bucket {b}", self._client.create_bucket, **kwargs)

    def bucket_delete(self, bucket: str | None = None, force: bool = False) -> int:
        """Delete a bucket.  With ``force``, first delete every object, version and upload.

        Returns the number of objects (and versions) deleted.
        """
        b = self._bucket(bucket)
        deleted = 0
        if force:
            deleted = self._empty_bucket(b)
        self._call(f"delete bucket {b}", self._client.delete_bucket, Bucket=b)
        return deleted

    def _empty_bucket(self, b: str) -> int:
        deleted = 0
        previous: list[dict[str, str]] = []
        try:
            # List from the start again after each batch: a continuation marker that names a
            # version just deleted ends the listing early on some servers (moto's among them).
            while True:
                page = self._client.list_object_versions(
                    Bucket=b, MaxKeys=S3Facts.delete_batch_size
                )
                batch = [
                    {"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                if not batch:
                    break
                if batch == previous:
                    raise StorageError(f"empty bucket {b}: objects remain after deleting them")
                deleted += self._delete_batch(b, batch)
                previous = batch
            uploads = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=b)
            for page in uploads:
                for u in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=b, Key=u["Key"], UploadId=u["UploadId"]
                    )
        except Exception as exc:
            raise _classify(exc, f"empty bucket {b}") from None
        return deleted

    def bucket_configure(
        self,
        bucket: str | None = None,
        *,
        versioning: bool | None = None,
        tags: dict[str, str] | None = None,
        block_public_access: bool | None = None,
    ) -> None:
        b = self._bucket(bucket)
        c = self._client
        if versioning is not None:
            status = "Enabled" if versioning else "Suspended"
            self._call(
                f"configure {b}",
                c.put_bucket_versioning,
                Bucket=b,
                VersioningConfiguration={"Status": status},
            )
        if tags is not None:
            tagset = [{"Key": k, "Value": v} for k, v in tags.items()]
            if tagset:
                self._call(f"tag {b}", c.put_bucket_tagging, Bucket=b, Tagging={"TagSet": tagset})
            else:
                self._call(f"untag {b}", c.delete_bucket_tagging, Bucket=b)
        if block_public_access is not None:
            flag = block_public_access
            self._call(
                f"configure {b}",
                c.put_public_access_block,
                Bucket=b,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": flag,
                    "IgnorePublicAcls": flag,
                    "BlockPublicPolicy": flag,
                    "RestrictPublicBuckets": flag,
                },
            )

    def bucket_configuration(self, bucket: str | None = None) -> dict[str, Any]:
        """Versioning status and tags of a bucket."""
        b = self._bucket(bucket)
        v = self._call(f"configuration of {b}", self._client.get_bucket_versioning, Bucket=b)
        try:
            t = self._client.get_bucket_tagging(Bucket=b).get("TagSet", [])
        except self._client.exceptions.ClientError:
            t = []  # NoSuchTagSet
        return {
            "versioning": v.get("Status", "Disabled"),
            "tags": {x["Key"]: x["Value"] for x in t},
        }

    # -- listing ----------------------------------------------------------------------------

    def bucket_list_keys(
        self,
        bucket: str | None = None,
        delimiter: str | None = None,
        prefix: str | None = None,
        start_after: str | None = None,
        fetch_owner: bool = False,
    ) -> Iterator[S3Key | str]:
        """Stream the keys under ``prefix`` over all pages.

        With a delimiter the keys come first, then the common prefixes (as strings), as the
        seed's ``bucket_list_keys`` does.
        """
        b = self._bucket(bucket)
        prefixes: list[str] = []
        for page in self.list_pages(b, prefix or "", delimiter, start_after, fetch_owner):
            yield from page.keys
            prefixes.extend(page.prefixes)
        yield from prefixes

    def list_pages(
        self,
        bucket: str | None,
        prefix: str,
        delimiter: str | None = None,
        start_after: str | None = None,
        fetch_owner: bool = False,
        page_size: int = 1000,
    ) -> Iterator[ListPage]:
        """One :class:`ListPage` per ListObjectsV2 response (keys and prefixes of that page)."""
        b = self._bucket(bucket)
        kwargs: dict[str, Any] = {"Bucket": b, "Prefix": prefix, "MaxKeys": page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if start_after:
            kwargs["StartAfter"] = start_after
        if fetch_owner:
            kwargs["FetchOwner"] = True
        what = f"list s3://{b}/{prefix}"
        while True:
            r = self._call(what, self._client.list_objects_v2, **kwargs)
            keys = [_s3key(c) for c in r.get("Contents", [])]
            prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            token = r.get("NextContinuationToken")
            more = bool(r.get("IsTruncated") and token)
            yield ListPage(keys, prefixes, more)
            if not more:
                return
            kwargs["ContinuationToken"] = token

    # -- objects: metadata ------------------------------------------------------------------

    def exists(self, remote_name: S3Name | str) -> tuple[bool, ObjectInfo | None]:
        """(True, info) when the object exists, (False, None) when it does not."""
        try:
            return True, self.head(remote_name)
        except BucketNotFound:
            raise
        except NotFound:
            return False, None

    def head(self, remote_name: S3Name | str, if_match: str | None = None) -> ObjectInfo:
        b, k = self._where(remote_name)
        kwargs: dict[str, Any] = {"Bucket": b, "Key": k}
        if if_match:
            kwargs["IfMatch"] = if_match
        r = self._call(f"s3://{b}/{k}", self._client.head_object, **kwargs)
        return ObjectInfo.from_response(k, r)

    def update_metadata(
        self,
        remote_name: S3Name | str,
        metadata: dict[str, str],
        *,
        replace: bool = False,
        content_type: str | None = None,
    ) -> ObjectInfo:
        """Change user metadata by a server-side copy onto itself (MetadataDirective=REPLACE).

        The content type (and storage class, encryption) are kept unless given.  Without
        ``replace`` the given pairs are merged into the existing metadata.
        """
        b, k = self._where(remote_name)
        info = self.head(remote_name)
        new_meta = dict(metadata) if replace else {**info.metadata, **metadata}
        options = WriteOptions(
            content_type=content_type or info.content_type or None,
            metadata=new_meta,
            storage_class=info.storage_class if info.storage_class != "STANDARD" else None,
        )
        self._copy(b, k, b, k, info.size, options, if_match=info.etag)
        return self.head(remote_name)

    # -- objects: data ----------------------------------------------------------------------

    def read(
        self,
        remote_name: S3Name | str,
        local_name: str,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Download to ``local_name`` atomically: a temporary file next to it, renamed on success.

        Big objects come down in parallel ranged parts.  Returns the object's info.
        """
        b, k = self._where(remote_name)
        info = self.head(remote_name)
        directory = os.path.dirname(os.path.abspath(local_name))
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(local_name)}.", suffix=".part", dir=directory
            )
        except OSError as exc:  # e.g. the directory does not exist
            code = exc.errno or errno.EIO
            raise LocalFileError(
                f"get s3://{b}/{k}: {os.strerror(code)} ({local_name})", code
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                self.read_stream(remote_name, f, info=info, progress=progress)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local_name)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, Exception):
                raise _classify(exc, f"get s3://{b}/{k}") from None
            raise
        return info

    def read_stream(
        self,
        remote_name: S3Name | str,
        stream: IO[bytes],
        *,
        info: ObjectInfo | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Write the object's bytes into a binary stream (parallel parts when it is seekable)."""
        b, k = self._where(remote_name)
        info = info or self.head(remote_name)
        # s3transfer itself pins the parts of a download to one ETag.
        extra = {"VersionId": info.version_id} if info.version_id else {}
        callback = self._counting(progress)
        try:
            if stream.seekable():
                self._client.download_fileobj(
                    b,
                    k,
                    stream,
                    ExtraArgs=extra,
                    Callback=callback,
                    Config=self._transfer_config(info.size),
                )
            else:
                if info.etag:
                    extra["IfMatch"] = f'"{info.etag}"'
                r = self._client.get_object(Bucket=b, Key=k, **extra)
                for chunk in r["Body"].iter_chunks(1 * MiB):
                    stream.write(chunk)
                    callback(len(chunk))
        except Exception as exc:
            raise _classify(exc, f"get s3://{b}/{k}") from None
        return info

    def read_range(
        self, remote_name: S3Name | str, start: int, length: int, etag: str | None = None
    ) -> bytes:
        """Bytes [start, start+length) of the object; with ``etag``, only of that version."""
        b, k = self._where(remote_name)
        if length <= 0:
            return b""
        kwargs: dict[str, Any] = {
            "Bucket": b,
            "Key": k,
            "Range": f"bytes={start}-{start + length - 1}",
        }
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        what = f"read s3://{b}/{k}"
        try:
            r = self._client.get_object(**kwargs)
            data = r["Body"].read()
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise _classify(exc, what) from None
        except Exception as exc:
            raise _classify(exc, what) from None
        self.counter.add_bytes(len(data), outgoing=False)
        return data

    def write(
        self,
        local_name: str,
        remote_name: S3Name | str,
        options: WriteOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Upload a local file: one PUT below the multipart threshold, parallel parts above."""
        b, k = self._where(remote_name)
        try:
            with open(local_name, "rb") as f:
                return self.write_stream(f, remote_name, options, progress)
        except StorageError:
            raise
        except OSError as exc:
            raise _classify(exc, f"put {local_name}") from None

    def write_stream(
        self,
        stream: IO[bytes],
        remote_name: S3Name | str,
        options: WriteOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> ObjectInfo:
        """Upload from a binary stream; returns the new object's info (ETag included).

        Integrity: botocore sends a CRC32 checksum with every PUT and part (flexible
        checksums), which S3 verifies before it stores the data.

        Memory: a regular file read from its start goes to s3transfer as ``/proc/self/fd/N``,
        so each part is read when it is sent (given a file object, s3transfer holds up to 10
        parts in memory: 160 MiB with 16 MiB parts), and the upload is of the file as opened
        even if its name goes meanwhile.
        """
        b, k = self._where(remote_name)
        options = options or WriteOptions()
        size = _remaining(stream)
        if size is not None and size > S3Facts.maximum_object_size:
            raise InvalidName(f"s3://{b}/{k}: larger than S3's 5 TiB object limit")
        extra = options.extra_args(k)
        what = f"put s3://{b}/{k}"
        callback = self._counting(progress, outgoing=True)
        try:
            if (
                options.if_match
                or options.if_none_match
                or (size is not None and size < self.transfer.multipart_threshold)
            ):
                # A single conditional / small PUT.
                body = stream.read()
                if options.if_match:
                    extra["IfMatch"] = f'"{options.if_match}"'
                if options.if_none_match:
                    extra["IfNoneMatch"] = "*"
                r = self._client.put_object(Bucket=b, Key=k, Body=body, **extra)
                callback(len(body))
                return ObjectInfo(
                    key=k,
                    size=len(body),
                    last_modified=datetime.now().astimezone(),
                    etag=str(r.get("ETag", "")).strip('"'),
                    content_type=extra["ContentType"],
                    version_id=r.get("VersionId"),
                    metadata=dict(options.metadata),
                )
            config = self._transfer_config(size)
            path = _whole_file_path(stream)
            if path is not None:
                self._client.upload_file(path, b, k, ExtraArgs=extra, Callback=callback,
                                         Config=config)  # fmt: skip
            else:
                self._client.upload_fileobj(stream, b, k, ExtraArgs=extra, Callback=callback,
                                            Config=config)  # fmt: skip
        except Exception as exc:
            raise _classify(exc, what) from None
        return self.head(remote_name)

    # -- multipart upload, part by part (for a file streamed while it is written) -----------

    def multipart_start(self, remote_name: S3Name | str, options: WriteOptions) -> str:
        """Begin a multipart upload with the object's type and metadata; returns its id.

        Every part carries a CRC32 that S3 checks (and, at least on moto, such parts are
        also taken in much faster than parts with a signed SHA-256 payload)."""
        b, k = self._where(remote_name)
        extra = options.extra_args(k)
        r = self._call(
            f"put s3://{b}/{k}",
            self._client.create_multipart_upload,
            Bucket=b, Key=k, ChecksumAlgorithm="CRC32", **extra,
        )  # fmt: skip
        return str(r["UploadId"])

    def multipart_part(
        self, remote_name: S3Name | str, upload_id: str, number: int, path: str, offset: int,
        length: int,
    ) -> Part:  # fmt: skip
        """Upload bytes [offset, offset+length) of the local file ``path`` as part ``number``
        (a part number sent again replaces the earlier one); returns what completing the
        upload needs of it."""
        b, k = self._where(remote_name)
        try:
            with open(path, "rb") as f:
                body = os.pread(f.fileno(), length, offset)
        except OSError as exc:
            raise _classify(exc, f"put {path}") from None
        r = self._call(
            f"put s3://{b}/{k} (part {number})",
            self._client.upload_part,
            Bucket=b, Key=k, UploadId=upload_id, PartNumber=number, Body=body,
            ChecksumAlgorithm="CRC32",
        )  # fmt: skip
        self.counter.add_bytes(len(body), outgoing=True)
        return _part(number, r)

    def multipart_copy_part(
        self, remote_name: S3Name | str, upload_id: str, number: int, start: int, length: int,
        etag: str,
    ) -> Part:  # fmt: skip
        """Part ``number`` copied in S3 from bytes [start, start+length) of the object itself,
        as of version ``etag`` (UploadPartCopy; nothing goes over the network)."""
        b, k = self._where(remote_name)
        r = self._call(
            f"copy s3://{b}/{k} (part {number})",
            self._client.upload_part_copy,
            Bucket=b, Key=k, UploadId=upload_id, PartNumber=number,
            CopySource={"Bucket": b, "Key": k},
            CopySourceRange=f"bytes={start}-{start + length - 1}",
            CopySourceIfMatch=f'"{etag}"',
        )  # fmt: skip
        return _part(number, r.get("CopyPartResult", {}))

    def write_keeping_head(
        self, local_name: str, remote_name: S3Name | str, etag: str, keep: int,
        options: WriteOptions,
    ) -> ObjectInfo:  # fmt: skip
        """Replace the object with its own first ``keep`` bytes (of version ``etag``, copied
        in S3) followed by the local file from offset ``keep``: an append to a big object
        sends only what is new.  ``keep`` must be at least the minimum part size."""
        size = os.path.getsize(local_name)
        part = self.transfer.part_size_for(size)
        copies = -(-keep // S3Facts.maximum_part_size)  # parts of the head, nearly equal
        bounds = [keep * i // copies for i in range(copies + 1)]
        upload_id = self.multipart_start(remote_name, options)
        try:
            parts = [
                self.multipart_copy_part(remote_name, upload_id, i + 1, lo, hi - lo, etag)
                for i, (lo, hi) in enumerate(pairwise(bounds))
            ]
            for off in range(keep, size, part):
                parts.append(self.multipart_part(
                    remote_name, upload_id, len(parts) + 1, local_name, off, min(part, size - off)
                ))  # fmt: skip
            self.multipart_finish(remote_name, upload_id, parts)
        except BaseException:
            with contextlib.suppress(StorageError):
                self.multipart_abort(remote_name, upload_id)
            raise
        return self.head(remote_name)

    def multipart_finish(self, remote_name: S3Name | str, upload_id: str, parts: list[Part]) -> str:
        """Complete the upload from its parts, in order; returns the object's ETag."""
        b, k = self._where(remote_name)
        r = self._call(
            f"put s3://{b}/{k}",
            self._client.complete_multipart_upload,
            Bucket=b, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts},
        )  # fmt: skip
        return str(r.get("ETag", "")).strip('"')

    def multipart_abort(self, remote_name: S3Name | str, upload_id: str) -> None:
        b, k = self._where(remote_name)
        with contextlib.suppress(NotFound):  # already completed or aborted
            self._call(
                f"abort upload of s3://{b}/{k}",
                self._client.abort_multipart_upload, Bucket=b, Key=k, UploadId=upload_id,
            )  # fmt: skip

    def _counting(
        self, progress: ProgressCallback | None, outgoing: bool = False
    ) -> ProgressCallback:
        def callback(n: int) -> None:
            self.counter.add_bytes(n, outgoing)
            if progress:
                progress(n)

        return callback

    # -- objects: copy, delete, urls --------------------------------------------------------

    def copy(
        self,
        src: S3Name | str,
        dst: S3Name | str,
        options: WriteOptions | None = None,
        size: int | None = None,
    ) -> ObjectInfo:
        """Server-side copy.  Without ``options`` the metadata is copied with the data.

        With the source's ``size`` known, a small object costs one request.
        """
        sb, sk = self._where(src)
        db, dk = self._where(dst)
        if size is not None and size <= self.transfer.copy_threshold:
            # One CopyObject: its answer tells the new ETag and time.
            r = self._copy(sb, sk, db, dk, size, options)
            result = r.get("CopyObjectResult", {})
            return ObjectInfo(
                key=dk,
                size=size,
                last_modified=result.get("LastModified") or datetime.now().astimezone(),
                etag=str(result.get("ETag", "")).strip('"'),
                version_id=r.get("VersionId"),
            )
        info = self.head(src)
        self._copy(sb, sk, db, dk, info.size, options, if_match=info.etag)
        return self.head(dst)

    def _copy(
        self,
        sb: str,
        sk: str,
        db: str,
        dk: str,
        size: int,
        options: WriteOptions | None,
        if_match: str | None = None,
    ) -> dict[str, Any]:
        what = f"copy s3://{sb}/{sk} to s3://{db}/{dk}"
        extra: dict[str, Any] = {}
        if options is not None:
            extra = options.extra_args(dk)
            extra["MetadataDirective"] = "REPLACE"
        try:
            if size <= self.transfer.copy_threshold:
                if if_match:
                    extra["CopySourceIfMatch"] = f'"{if_match}"'
                # A checksum of its own: the source's may be one of parts (moto even keeps
                # such a one on the copy, which then fails every whole-object GET).
                return self._client.copy_object(
                    CopySource={"Bucket": sb, "Key": sk}, Bucket=db, Key=dk,
                    ChecksumAlgorithm="CRC32", **extra,
                )  # fmt: skip
            else:
                extra.pop("MetadataDirective", None)
                if options is None:
                    # Multipart copy does not carry metadata over by itself.
                    src = self.head(S3Name(sk, sb))
                    extra = WriteOptions(
                        content_type=src.content_type or None, metadata=src.metadata
                    ).extra_args(dk)
                self._client.copy(
                    {"Bucket": sb, "Key": sk},
                    db,
                    dk,
                    ExtraArgs=extra,
                    Config=self._transfer_config(size),
                )
                return {}
        except Exception as exc:
            raise _classify(exc, what) from None

    def delete(self, remote_name: S3Name | str) -> None:
        b, k = self._where(remote_name)
        self._call(f"delete s3://{b}/{k}", self._client.delete_object, Bucket=b, Key=k)

    def delete_many(self, keys: Iterable[str], bucket: str | None = None) -> int:
        """Delete many keys with batched DeleteObjects (1,000 a request).  Returns the count."""
        b = self._bucket(bucket)
        deleted = 0
        batch: list[dict[str, str]] = []
        for k in keys:
            batch.append({"Key": k})
            if len(batch) == S3Facts.delete_batch_size:
                deleted += self._delete_batch(b, batch)
                batch = []
        if batch:
            deleted += self._delete_batch(b, batch)
        return deleted

    def _delete_batch(self, b: str, batch: list[dict[str, str]]) -> int:
        r = self._call(
            f"delete from {b}",
            self._client.delete_objects,
            Bucket=b,
            Delete={"Objects": batch, "Quiet": True},
        )
        errors = r.get("Errors", [])
        if errors:
            e = errors[0]
            raise StorageError(
                f"delete s3://{b}/{e.get('Key')}: {e.get('Message') or e.get('Code')}",
                code=e.get("Code"),
            )
        return len(batch)

    def presigned_url(
        self, remote_name: S3Name | str, expires: int = 3600, method: str = "GET"
    ) -> str:
        b, k = self._where(remote_name)
        op = {"GET": "get_object", "PUT": "put_object"}[method.upper()]
        return self._call(
            f"sign s3://{b}/{k}",
            self._client.generate_presigned_url,
            ClientMethod=op,
            Params={"Bucket": b, "Key": k},
            ExpiresIn=int(expires),
        )

    def make_public(self, remote_name: S3Name | str) -> None:
        b, k = self._where(remote_name)
        self._call(
            f"make public s3://{b}/{k}",
            self._client.put_object_acl,
            Bucket=b,
            Key=k,
            ACL="public-read",
        )


@dataclass
class ListPage:
    keys: list[S3Key]
    prefixes: list[str]
    more: bool = False  # more pages follow


def _user_agent() -> str:
    import platform

    import botocore

    from s3mount import __version__

    python = platform.python_version()
    return f"s3mount/{__version__} botocore/{botocore.__version__} python/{python}"


def _no_expect_for_small_bodies(params: dict[str, Any], **_: Any) -> None:
    """botocore asks for ``Expect: 100-continue`` on every PUT with a body, which costs a
    round trip before the body is sent.  Worth it for big bodies that S3 may refuse; for small
    ones (a whole small file, most multipart parts are not) just send the body."""
    headers = params.get("headers", {})
    if "Expect" in headers and "body" in params:
        from botocore.utils import determine_content_length

        length = determine_content_length(params["body"])
        if length is not None and length <= SMALL_BODY:
            del headers["Expect"]


def _s3key(c: dict[str, Any]) -> S3Key:
    owner = c.get("Owner")
    return S3Key(
        key=c["Key"],
        size=int(c.get("Size", 0)),
        last_modified=c["LastModified"],
        etag=str(c.get("ETag", "")).strip('"'),
        storage_class=c.get("StorageClass") or "STANDARD",
        owner=S3Owner(owner.get("ID", ""), owner.get("DisplayName", "")) if owner else None,
    )


def _whole_file_path(stream: IO[bytes]) -> str | None:
    """A path that opens the same file as ``stream``, if it is a regular file read from its
    start (``/proc/self/fd/N``: valid while ``stream`` is open); else None."""
    try:
        fd = stream.fileno()
        if stream.tell() == 0 and stat.S_ISREG(os.fstat(fd).st_mode):
            return f"/proc/self/fd/{fd}"
    except (OSError, ValueError):  # no descriptor (BytesIO), or not seekable
        pass
    return None


def _remaining(stream: IO[bytes]) -> int | None:
    """Bytes left in a seekable stream, or None when it can't be told."""
    try:
        if not stream.seekable():
            return None
        pos = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(pos)
        return end - pos
    except (OSError, ValueError):
        return None
