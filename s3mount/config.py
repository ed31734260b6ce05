"""Mount settings from four places, in order: flags > ``S3MOUNT_*`` environment > config file >
defaults.

The config file (TOML: ``$S3MOUNT_CONFIG``, else ``config.toml`` in the user config directory,
else ``/etc/s3mount/config.toml``) holds named mounts::

    [mounts.photos]
    bucket = "my-photos"
    prefix = "2024"
    mountpoint = "/mnt/photos"
    profile = "minio"
    endpoint_url = "https://minio.example:9000"
    options = "ro,allow_other"          # mount-helper form, or a table of settings
    listing_ttl = 30                    # any setting can also be a key of its own

Every problem is a :class:`ConfigError` whose message is one line naming the file, the line
and the key (or the environment variable).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import platformdirs

from s3mount.core.metadata import METADATA_MODES

CONFIG_ENV = "S3MOUNT_CONFIG"
ENV_PREFIX = "S3MOUNT_"

# mount(8) and mount.fuse3 options that mean nothing to s3mount (fstab, mount helpers).
IGNORED_O = {
    "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "auto", "noauto", "_netdev",
    "nofail", "user", "users", "nouser", "defaults", "atime", "noatime", "relatime",
    "strictatime", "async", "sync", "loud", "silent",
}  # fmt: skip
# -o flags without a value, and the setting each turns on
FLAG_O = {
    "ro": "read_only",
    "read_only": "read_only",
    "allow_other": "allow_other",
    "path_style": "path_style",
    "no_verify_ssl": "no_verify_ssl",
}
CREDENTIAL_KEYS = {
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key_id",
    "secret_access_key", "session_token", "access_key", "secret_key", "password",
}  # fmt: skip
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A bad setting: the message is one line naming where it came from."""


# -- value kinds ------------------------------------------------------------------------------


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _int(v: Any) -> int:
    if isinstance(v, bool | float):
        raise ValueError("expected a whole number")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ValueError("expected a whole number")


def _at_least(n: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        value = _int(v)
        if value < n:
            raise ValueError(f"expected a whole number of at least {n}")
        return value

    return conv


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            pass
    raise ValueError("expected a number")


def _float_or_none(v: Any) -> float | None:
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() in ("none", "off")):
        return None
    try:
        return _float(v)
    except ValueError:
        raise ValueError("expected a number, or none/off") from None


def _octal(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        value = v
    elif isinstance(v, str) and re.fullmatch(r"0?[0-7]{1,4}|0o[0-7]{1,4}", v.strip()):
        value = int(v.strip().removeprefix("0o"), 8)
    else:
        raise ValueError('expected an octal mode such as "022"')
    if not 0 <= value <= 0o7777:
        raise ValueError('expected an octal mode such as "022"')
    return value


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _port(v: Any) -> int | None:
    if v is None or v is False or (isinstance(v, str) and v.strip().lower() in ("", "off", "0")):
        return None
    n = _int(v)
    if not 1 <= n <= 65535:
        raise ValueError("expected a port number (1-65535)")
    return n


def _metadata_mode(v: Any) -> str:
    if isinstance(v, str) and v.strip().lower() in METADATA_MODES:
        return v.strip().lower()
    raise ValueError(f"expected one of {', '.join(METADATA_MODES)}")


def _log_level(v: Any) -> str:
    if isinstance(v, str) and v.strip().upper() in LOG_LEVELS:
        return v.strip().upper()
    raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")


# -- the settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    connection: bool = False  # also used by the bucket and object commands
    in_file: bool = True  # may appear in the config file


_S = Setting
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        _S("endpoint_url", _str, None, "S3 endpoint URL (default: AWS, or the profile's)", True),
        _S("region", _str, None, "region (default: the profile's or AWS_REGION)", True),
        _S("profile", _str, None, "named profile of the shared AWS files", True),
        _S("path_style", _bool, False, "path-style addressing (http://host/bucket/key)", True),
        _S("no_verify_ssl", _bool, False, "do not check TLS certificates", True),
        _S("ca_bundle", _str, None, "CA certificates to verify TLS with", True),
        _S("retries", _at_least(1), None, "attempts per request, the first included (5)", True),
        _S("foreground", _bool, False, "stay in front and log to stderr", in_file=False),
        _S("read_only", _bool, False, "every change gives EROFS"),
        _S("allow_other", _bool, False, "let other users in"),
        _S("uid", _int, None, "owner of files (default: the mounting user)"),
        _S("gid", _int, None, "group of files (default: the mounting user's)"),
        _S("umask", _octal, 0o022, "mode bits removed, octal (022)"),
        _S("cache_dir", _str, None, "local cache (default: the user cache dir)"),
        _S("listing_ttl", _float, 60.0, "seconds a directory listing is trusted (60)"),
        _S(
            "cache_size",
            _at_least(0),
            2048,
            "MiB of disk for closed files' data, so that re-reading costs no request (2048)",
        ),
        _S(
            "metadata",
            _metadata_mode,
            "auto",
            "POSIX metadata of objects the cache does not know: auto (sample each directory "
            "with a few HEADs), head (a HEAD each), listing (none: the defaults) (auto)",
        ),
        _S("attr_timeout", _float, 1.0, "seconds the kernel trusts attributes and names (1)"),
        _S("negative_timeout", _float, 1.0, "seconds the kernel trusts a missing name (1)"),
        _S(
            "key_sync_timeout",
            _float_or_none,
            1.0,
            "wait at most this long for each upload to read back; 0: no limit, none: no check (1)",
        ),
        _S("threads", _at_least(1), 16, "parallel S3 requests (16)"),
        _S("io_timeout", _float, 60.0, "a read from S3 taking longer fails with EIO (60)"),
        _S(
            "write_back",
            _float_or_none,
            None,
            "close() returns once the data is journaled; uploads start SECONDS later (off)",
        ),
        _S("part_size", _at_least(5), 16, "multipart part size in MiB, at least 5 (16)"),
        _S("log_level", _log_level, "INFO", "DEBUG, INFO, WARNING or ERROR (INFO)"),
        _S("log_file", _str, None, "daemon log file (default: journald or CACHE_DIR/s3mount.log)"),
        _S("metrics_port", _port, None, "serve Prometheus metrics on this port (off)"),
        _S("metrics_host", _str, "127.0.0.1", "address of the metrics endpoint (127.0.0.1)"),
    ]
}
# Which bucket and where: from the command line, a named mount, or the environment.
IDENTITY = ("bucket", "prefix", "mountpoint")
MOUNT_KEYS = {*IDENTITY, "options", *(n for n, s in SETTINGS.items() if s.in_file)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def convert(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` (raises ValueError with a short reason)."""
    return SETTINGS[name].convert(value)


def parse_o(items: list[str]) -> dict[str, Any]:
    """``-o a=b,c`` (mount-helper form) as raw setting values; ValueError names the item."""
    out: dict[str, Any] = {}
    for group in items:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if name in IGNORED_O or name.startswith("x_") or name.startswith("comment"):
                continue
            if not sep:
                if name not in FLAG_O:
                    raise ValueError(f"-o {item}: unknown flag")
                out[FLAG_O[name]] = True
                continue
            if name not in SETTINGS or name == "foreground":
                raise ValueError(f"-o {item}: unknown option")
            try:
                out[name] = convert(name, value)
            except ValueError as exc:
                raise ValueError(f"-o {item}: {exc}") from None
    return out


# -- the config file --------------------------------------------------------------------------


SYSTEM_CONFIG = "/etc/s3mount/config.toml"


def config_path(environ: Mapping[str, str] | None = None) -> str:
    """``$S3MOUNT_CONFIG``, else the user's ``config.toml`` if it exists (platformdirs:
    ``~/.config/s3mount``), else the system's ``/etc/s3mount/config.toml`` if it exists."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(CONFIG_ENV)
    if explicit:
        return explicit
    user = os.path.join(platformdirs.user_config_dir("s3mount"), "config.toml")
    if not os.path.exists(user) and os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    return user


@dataclass
class ConfigFile:
    path: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def line_of(self, *keys: str) -> int:
        """The line where the dotted key ``keys`` is set (or its closest parent), else 0."""
        return _line_of(self.text, list(keys))

    def error(self, keys: tuple[str, ...], reason: str) -> ConfigError:
        line = self.line_of(*keys)
        where = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{where}: {'.'.join(keys)}: {reason}")


def load_config(path: str, required: bool = False) -> ConfigFile:
    """Read and check the whole file (a missing file is empty, unless ``required``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found (from ${CONFIG_ENV})") from None
        return ConfigFile(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = m.group(1) if m else str(text.count("\n") + 1)  # "at end of document"
        reason = re.sub(r"\s*\(at line \d+, column \d+\)|\s*\(at end of document\)", "", str(exc))
        raise ConfigError(f"{path}:{line}: invalid TOML: {reason}") from None
    cfg = ConfigFile(path, text, data)
    _check(cfg)
    return cfg


def _check(cfg: ConfigFile) -> None:
    for key, value in cfg.data.items():
        if key != "mounts":
            raise cfg.error((key,), "unknown key (expected [mounts.NAME] tables)")
        if not isinstance(value, dict):
            raise cfg.error((key,), "expected a table of [mounts.NAME]")
    for name, mount in cfg.data.get("mounts", {}).items():
        if not isinstance(mount, dict):
            raise cfg.error(("mounts", name), "expected a table")
        if ":" in name or "/" in name:
            raise cfg.error(("mounts", name), "a mount name cannot hold ':' or '/'")
        mount_settings(cfg, name)


def mount_settings(cfg: ConfigFile, name: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The converted settings of the named mount (identity keys included), and the line
    each was set on."""
    mount = cfg.data["mounts"][name]
    out: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if "bucket" not in mount:
        raise cfg.error(("mounts", name), "bucket is missing")
    for key, value in mount.items():
        keys = ("mounts", name, key)
        if key.lower() in CREDENTIAL_KEYS:
            raise cfg.error(keys, "credentials do not belong here: use a profile (see --profile)")
        if key not in MOUNT_KEYS:
            raise cfg.error(keys, "unknown key")
        if key == "options":
            continue
        try:
            if key in IDENTITY:
                out[key] = _str(value) if key != "prefix" else _prefix(value)
            else:
                out[key] = convert(key, value)
        except ValueError as exc:
            raise cfg.error(keys, f"{exc}, got {value!r}") from None
        lines[key] = cfg.line_of(*keys)
    options = mount.get("options")
    if options is not None:
        opts = _options(cfg, name, options)
        for key in opts.keys() & out.keys():
            raise cfg.error(("mounts", name, "options"), f"{key} is also set as a key of its own")
        out.update(opts)
        for key in opts:
            lines[key] = cfg.line_of("mounts", name, "options", key)
    return out, lines


def _prefix(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value.strip("/")


def _options(cfg: ConfigFile, name: str, options: Any) -> dict[str, Any]:
    keys = ("mounts", name, "options")
    if isinstance(options, str):
        try:
            return parse_o([options])
        except ValueError as exc:
            raise cfg.error(keys, str(exc)) from None
    if not isinstance(options, dict):
        raise cfg.error(keys, 'expected a string ("ro,uid=1000") or a table')
    out = {}
    for key, value in options.items():
        if key not in SETTINGS or not SETTINGS[key].in_file:
            raise cfg.error((*keys, key), "unknown option")
        try:
            out[key] = convert(key, value)
        except ValueError as exc:
            raise cfg.error((*keys, key), f"{exc}, got {value!r}") from None
    return out


_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")


def _split_dotted(s: str) -> list[str]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_\-]+)', s)
    return [a or b or c for a, b, c in parts]


def _line_of(text: str, keys: list[str]) -> int:
    """Best effort: the 1-based line that sets ``keys``, or the nearest parent's line."""
    best, best_len, child = 0, 0, 0  # the nearest parent's line, and the first child's
    table: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            table = _split_dotted(m.group(1))
            path = table
        elif m := _ASSIGN.match(line):
            path = table + _split_dotted(m.group(1))
        else:
            continue
        if path == keys:
            return lineno
        n = len(path)
        if n > best_len and path == keys[:n]:
            best, best_len = lineno, n
        if not child and path[: len(keys)] == keys:
            child = lineno  # [mounts.x.options] without a [mounts.x] line
    return child or best


# -- resolution -------------------------------------------------------------------------------


@dataclass
class Resolved:
    """Every setting's value and where it came from (flag, env NAME, FILE:LINE, default)."""

    values: dict[str, Any]
    origins: dict[str, str]
    name: str | None  # the named mount, if any
    config: str  # the config file's path

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def env_settings(environ: Mapping[str, str], names: list[str] | None = None) -> dict[str, Any]:
    """The ``S3MOUNT_*`` variables that are set, converted (ConfigError names a bad one)."""
    out = {}
    for name in names if names is not None else list(SETTINGS):
        var = env_name(name)
        if var not in environ or environ[var] == "":
            continue
        try:
            out[name] = convert(name, environ[var])
        except ValueError as exc:
            raise ConfigError(f"${var}: {exc}, got {environ[var]!r}") from None
    return out


def resolve(
    source: str | None,
    mountpoint: str | None,
    flags: dict[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """The settings of one mount. ``source`` is BUCKET[:PREFIX], a mount NAME, or None (from
    ``$S3MOUNT_BUCKET``/``$S3MOUNT_PREFIX``); ``flags`` are the command line's (``-o``
    included), already converted."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    cfg = load_config(path, required=bool(environ.get(CONFIG_ENV)))
    env = env_settings(environ)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    name = None
    file_values: dict[str, Any] = {}
    file_lines: dict[str, int] = {}
    if source and ":" not in source and source in cfg.data.get("mounts", {}):
        name = source
        file_values, file_lines = mount_settings(cfg, name)
    elif source:
        bucket, _, prefix = source.partition(":")
        if not bucket:
            raise ConfigError(f"{source!r}: expected BUCKET[:PREFIX] or a mount name")
        values.update(bucket=bucket, prefix=prefix.strip("/"))
        origins.update(bucket="command line", prefix="command line")
    else:
        for key in ("bucket", "prefix"):
            var = env_name(key)
            if environ.get(var):
                values[key] = environ[var].strip("/") if key == "prefix" else environ[var]
                origins[key] = f"${var}"
        if "bucket" not in values:
            raise ConfigError(
                f"no bucket given: BUCKET[:PREFIX], a mount name from {path}, "
                f"or ${ENV_PREFIX}BUCKET"
            )
        values.setdefault("prefix", "")
        origins.setdefault("prefix", "default")
    for key in ("bucket", "prefix"):
        if key in file_values:
            values[key] = file_values.pop(key)
            origins[key] = f"{path}:{file_lines[key]}"
    values.setdefault("prefix", "")
    origins.setdefault("prefix", "default")

    mp_var = env_name("mountpoint")
    if mountpoint:
        values["mountpoint"], origins["mountpoint"] = mountpoint, "command line"
    elif environ.get(mp_var):
        values["mountpoint"], origins["mountpoint"] = environ[mp_var], f"${mp_var}"
    elif "mountpoint" in file_values:
        values["mountpoint"] = file_values["mountpoint"]
        origins["mountpoint"] = f"{path}:{file_lines['mountpoint']}"
    else:
        where = f" (or set mountpoint for {name} in {path})" if name else ""
        raise ConfigError(f"no mount point given{where}")
    file_values.pop("mountpoint", None)

    for key, setting in SETTINGS.items():
        if key in flags:
            values[key], origins[key] = flags[key], "command line"
        elif key in env:
            values[key], origins[key] = env[key], f"${env_name(key)}"
        elif key in file_values:
            values[key], origins[key] = file_values[key], f"{path}:{file_lines[key]}"
        else:
            values[key], origins[key] = setting.default, "default"
    return Resolved(values, origins, name, path)
