"""The config file, S3MOUNT_* variables and their precedence; credentials and endpoints through
boto3's chain (environment, shared files with named profiles, a profile's endpoint_url, IMDS)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, MotoServer, run_cli

from s3mount import config as s3mount_config
from s3mount.cli import main
from s3mount.config import IGNORED_O, SETTINGS, ConfigError, env_name, load_config, resolve
from s3mount.storage import Storage


@pytest.fixture
def cli_here(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """The ``s3mount`` command run in this process (fast: for what needs no mount)."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with monkeypatch.context() as mp:
            for k, v in (env or {}).items():
                mp.setenv(k, v)
            code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def settings(r) -> dict[str, tuple[object, str]]:
    """``mount --dry-run`` output as {name: (value, origin)}."""
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines()[1:]:
        name, rest = line.split("=", 1)
        value, origin = rest.rsplit("  # ", 1)
        out[name.strip()] = (json.loads(value), origin)
    return out


def one_line_error(r, exit_code: int = 2) -> str:
    assert r.returncode == exit_code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s3mount: error: "), r.stderr
    return lines[0]


def test_precedence_flag_over_environment_over_file_over_default(tmp_path: Path, cli_here) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "# named mounts\n"
        "[mounts.photos]\n"
        'bucket = "my-photos"\n'
        'prefix = "/2024/"\n'
        'mountpoint = "/mnt/photos"\n'
        "listing_ttl = 30\n"
        "threads = 4\n"
        "attr_timeout = 3\n"
        'options = "ro,uid=1234"\n'
    )
    env = {
        "S3MOUNT_CONFIG": str(config),
        "S3MOUNT_LISTING_TTL": "20",
        "S3MOUNT_THREADS": "8",
        "S3MOUNT_BUCKET": "not-this-one",  # a named mount's bucket comes from its file
    }
    s = settings(
        cli_here("mount", "photos", "--dry-run", "--listing-ttl", "5", "-o", "uid=42", env=env)
    )
    where = str(config)
    assert s["bucket"] == ("my-photos", f"{where}:3")
    assert s["prefix"] == ("2024", f"{where}:4")
    assert s["mountpoint"] == ("/mnt/photos", f"{where}:5")
    assert s["listing_ttl"] == (5.0, "command line")  # flag > env > file
    assert s["threads"] == (8, "$S3MOUNT_THREADS")  # env > file
    assert s["attr_timeout"] == (3.0, f"{where}:8")  # file > default
    assert s["uid"] == (42, "command line")  # -o is the command line too
    assert s["read_only"] == (True, f"{where}:9")  # from the file's options string
    assert s["io_timeout"] == (60.0, "default")
    assert s["umask"] == ("022", "default")

    # an environment mount point beats the file's, a positional one beats both
    env["S3MOUNT_MOUNTPOINT"] = "/mnt/env"
    s = settings(cli_here("mount", "photos", "--dry-run", "--no-read-only", env=env))
    assert s["mountpoint"] == ("/mnt/env", "$S3MOUNT_MOUNTPOINT")
    assert s["read_only"] == (False, "command line")
    s = settings(cli_here("mount", "photos", "/mnt/arg", "--dry-run", env=env))
    assert s["mountpoint"] == ("/mnt/arg", "command line")

    # no source at all: the bucket comes from the environment (the container's way)
    s = settings(cli_here("mount", "--dry-run", env={**env, "S3MOUNT_PREFIX": "p/"}))
    assert s["bucket"] == ("not-this-one", "$S3MOUNT_BUCKET")
    assert s["prefix"] == ("p", "$S3MOUNT_PREFIX")
    # BUCKET:PREFIX that is no mount name, in the short form without "mount"
    s = settings(cli_here("other:x/y", "/mnt/o", "--dry-run", env=env))
    assert s["bucket"] == ("other", "command line") and s["prefix"] == ("x/y", "command line")


BAD_CONFIGS = [
    ('[mounts.a\nbucket = "x"\n', ":1: invalid TOML"),
    ('[mounts.a]\nbucket = "x"\nlisting_tl = 3\n', ":3: mounts.a.listing_tl: unknown key"),
    (
        '[mounts.a]\nbucket = "x"\n\nthreads = "many"\n',
        ":4: mounts.a.threads: expected a whole number, got 'many'",
    ),
    (
        '[mounts.a]\nbucket = "x"\n[mounts.a.options]\nread_only = "maybe"\n',
        ":4: mounts.a.options.read_only: expected true or false",
    ),
    (
        '[mounts.a]\nbucket = "x"\noptions = "ro,bogus=1"\n',
        ":3: mounts.a.options: -o bogus=1: unknown option",
    ),
    ('\n[mounts.a]\nprefix = "p"\n', ":2: mounts.a: bucket is missing"),
    ('[mount.a]\nbucket = "x"\n', ":1: mount: unknown key"),
    (
        '[mounts.a]\nbucket = "x"\naws_secret_access_key = "s3cr3t"\n',
        ":3: mounts.a.aws_secret_access_key: credentials do not belong here",
    ),
    ('[mounts.a]\nbucket = "x"\numask = "999"\n', ":3: mounts.a.umask: expected an octal"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_names_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(config))
    message = str(e.value)
    assert message.startswith(f"{config}:") and expected in message, message
    assert "\n" not in message and "s3cr3t" not in message


def test_bad_settings_are_one_line_usage_errors(tmp_path: Path, cli_here) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[mounts.a]\nbucket = "x"\nthreads = 1.5\n')
    line = one_line_error(run_cli("mount", "a", "/mnt", env={"S3MOUNT_CONFIG": str(config)}))
    assert f"{config}:3: mounts.a.threads: expected a whole number" in line
    line = one_line_error(
        cli_here("mount", "b", "/mnt", env={"S3MOUNT_CONFIG": str(tmp_path / "missing.toml")})
    )
    assert "missing.toml: config file not found" in line
    env = {"S3MOUNT_CONFIG": str(tmp_path / "none.toml"), "S3MOUNT_LISTING_TTL": "soon"}
    (tmp_path / "none.toml").write_text("")
    line = one_line_error(cli_here("mount", "b", "/mnt", env=env))
    assert line.endswith("$S3MOUNT_LISTING_TTL: expected a number, got 'soon'")
    line = one_line_error(cli_here("mount", "b", "/mnt", "-o", "threads=x", env=env))
    assert "-o threads=x: expected a whole number" in line
    line = one_line_error(cli_here("mount", env={"S3MOUNT_CONFIG": str(tmp_path / "none.toml")}))
    assert "no bucket given" in line


def test_resolve_without_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("S3MOUNT_CONFIG", raising=False)
    monkeypatch.setattr(s3mount_config, "SYSTEM_CONFIG", str(tmp_path / "etc-s3mount.toml"))
    res = resolve("b:p", "/m", {})  # the default file does not exist: no error
    assert res.config == str(tmp_path / "s3mount" / "config.toml")
    assert (res.bucket, res.prefix, res.mountpoint, res.threads) == ("b", "p", "/m", 16)
    (tmp_path / "etc-s3mount.toml").write_text('[mounts.sys]\nbucket = "from-etc"\n')
    res = resolve("sys", "/m", {})  # no user file: the system's
    assert res.config == str(tmp_path / "etc-s3mount.toml") and res.bucket == "from-etc"


# -- credentials and endpoints -----------------------------------------------------------------


def aws_files(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """A shared credentials file with a named profile, and a config file whose profiles set
    the endpoint (one of them an assume-role profile); no keys in the environment, no
    instance metadata."""
    creds = tmp_path / "credentials"
    creds.write_text(
        "[named]\naws_access_key_id = named-key-id\naws_secret_access_key = named-secret\n"
    )
    conf = tmp_path / "aws-config"
    conf.write_text(
        f"[profile named]\nregion = us-east-1\n\n"
        f"[profile with-endpoint]\nregion = us-east-1\nendpoint_url = {endpoint}\n"
        "aws_access_key_id = endpoint-key-id\naws_secret_access_key = endpoint-secret\n\n"
        f"[profile role]\nregion = us-east-1\nendpoint_url = {endpoint}\n"
        "role_arn = arn:aws:iam::123456789012:role/s3mount-test\nsource_profile = with-endpoint\n"
    )
    return {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_CONFIG_FILE": str(conf),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def test_credentials_from_environment_profiles_and_profile_endpoint(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    env = aws_files(tmp_path, s3_server.endpoint)
    e = s3_server.endpoint
    # (a) keys in the environment, path-style addressing
    keys = {**env, "AWS_ACCESS_KEY_ID": "env-key-id", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    r = run_cli("--endpoint-url", e, "--path-style", "list-buckets", bucket, env=keys)
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    # no keys anywhere: a clear error
    assert "no AWS credentials found" in one_line_error(
        run_cli("--endpoint-url", e, "list-buckets", env=env), exit_code=3
    )
    # (b) a named profile of the shared credentials file, by flag or by S3MOUNT_PROFILE
    r = run_cli("--endpoint-url", e, "--profile", "named", "list-buckets", bucket, env=env)
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    r = run_cli(
        "--endpoint-url", e, "list-buckets", bucket, env={**env, "S3MOUNT_PROFILE": "named"}
    )
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    # (c) the profile's endpoint_url: no --endpoint-url needed
    r = run_cli("--profile", "with-endpoint", "list-buckets", bucket, env=env)
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    out = r.stdout + r.stderr
    # (d) an assume-role profile: STS (the test server's) hands out temporary keys
    r = run_cli("--profile", "role", "list-buckets", bucket, env=env)
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    r = run_cli("--profile", "role", "url", "k", "-b", bucket, env=env)
    assert r.returncode == 0 and "X-Amz-Security-Token=" in r.stdout, r.stderr
    assert "endpoint-key-id" not in r.stdout  # signed with the role's keys, not the source's
    out += r.stdout + r.stderr
    for secret in ("named-secret", "endpoint-secret", "env-secret"):
        assert secret not in out


def test_named_mount_with_a_profile_that_sets_the_endpoint(
    s3_server: MotoServer, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    """``s3mount mount NAME``: bucket, prefix, mount point, profile from the config file; the
    endpoint and the keys from that profile of the AWS files."""
    env = aws_files(tmp_path, s3_server.endpoint)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = tmp_path / "s3mount.toml"
    config.write_text(
        f'[mounts.work]\nbucket = "{bucket}"\nprefix = "team"\nmountpoint = "{mnt}"\n'
        f'profile = "with-endpoint"\ncache_dir = "{tmp_path / "cache"}"\n'
        "[mounts.work.options]\nlisting_ttl = 1\n"
    )
    env["S3MOUNT_CONFIG"] = str(config)
    r = run_cli("mount", "work", env=env)
    try:
        assert r.returncode == 0, r.stderr
        (mnt / "note.txt").write_text("through the profile's endpoint")
        r = run_cli("unmount", str(mnt), env=env)
        assert r.returncode == 0, r.stderr
    finally:
        os.system(f"fusermount3 -u -z {mnt} 2>/dev/null")
    got = storage.client.get_object(Bucket=bucket, Key="team/note.txt")["Body"].read()
    assert got == b"through the profile's endpoint"
    log = (tmp_path / "cache" / "s3mount.log").read_text()
    assert "endpoint-secret" not in log and "endpoint-key-id" not in log


class _Imds(BaseHTTPRequestHandler):
    """The EC2 instance metadata service's credential paths (IMDSv2), on loopback."""

    role = "s3mount-test-role"
    served: list[str] = []

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token":
            self._send(200, "imds-token")
        else:
            self._send(404, "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != "imds-token":
            self._send(401, "")
        elif self.path == "/latest/meta-data/iam/security-credentials/":
            self._send(200, self.role)
        elif self.path == f"/latest/meta-data/iam/security-credentials/{self.role}":
            self.served.append(self.path)
            creds = {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": "imds-key-id",
                "SecretAccessKey": "imds-secret",
                "Token": "imds-session-token",
                "Expiration": "2099-01-01T00:00:00Z",
                "LastUpdated": "2024-01-01T00:00:00Z",
            }
            self._send(200, json.dumps(creds))
        else:
            self._send(404, "")

    def _send(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def imds() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_credentials_from_instance_metadata(
    s3_server: MotoServer, bucket: str, tmp_path: Path, imds: str
) -> None:
    env = aws_files(tmp_path, s3_server.endpoint)
    env.pop("AWS_EC2_METADATA_DISABLED")
    env = {**env, "AWS_EC2_METADATA_DISABLED": "false", "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds}
    _Imds.served.clear()
    r = run_cli("--endpoint-url", s3_server.endpoint, "list-buckets", bucket, env=env)
    assert r.returncode == 0 and bucket in r.stdout, r.stderr
    assert _Imds.served  # the keys came from the metadata service


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name in SETTINGS:
        assert f"`{env_name(name)}`" in doc, name
        assert "--" + name.replace("_", "-") in doc, name
    for name in IGNORED_O:
        assert f"`{name}`" in doc, name
