"""Settings: the environment (JLM_*), secrets from files, and the TOML file of job types.

One loading path, `load(environ)`, reads exactly the mapping it is given (`os.environ` only when
given none) and the files that mapping names; nothing else reads the environment. For each
setting the first source that is set wins:

1. the broker and Redis URLs only: the file named by `JLM_<NAME>_FILE`, then the systemd
   credential `$CREDENTIALS_DIRECTORY/<name>`;
2. the variable `JLM_<NAME>`;
3. the built-in default.

A variable that is empty (or only white space) counts as unset. The TOML file named by
`JLM_CONFIG` holds the limits, job types and grants (`FileConfig`); a key it leaves out keeps its
default. Every failure is a `ConfigError` whose one-line message names the setting or the file.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")
Policy = Literal["replace", "skip", "reuse", "debounce"]
OPERATIONS = ("manage", "cancel", "status", "invalidate", "result")


class ConfigError(Exception):
    """A setting is wrong; the message names it. The daemon exits 78 (EX_CONFIG)."""


class JobTypeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str | None = None
    policy: Policy = "replace"
    result_ttl: Annotated[int, Field(gt=0)] = 3600
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 1
    retry_backoff: Annotated[float, Field(ge=0)] = 1.0
    # Policy debounce: the default quiet time and bound of the wait, in ms (a request may set them).
    debounce_ms: Annotated[int, Field(ge=1, le=86_400_000)] | None = None
    max_wait_ms: Annotated[int, Field(ge=1, le=86_400_000)] | None = None

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, v: str | None) -> str | None:
        if v is not None and not QUEUE_RE.match(v):
            raise ValueError("queue names use letters, digits and . _ : - (1..255)")
        return v


class UserGrant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefixes: tuple[str, ...] = ()
    job_types: tuple[str, ...] = ()
    operations: tuple[str, ...] = ()
    # Where replies may go: by default only server-named queues and direct reply-to, so a request
    # cannot fill another queue of the vhost with replies.
    reply_to: tuple[str, ...] = ("amq.gen-*", "amq.rabbitmq.reply-to*")

    def allows(self, op: str, cache_prefix: str | None, job_type: str | None) -> bool:
        def match(name: str, globs: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)

        if not match(op, self.operations):
            return False
        if cache_prefix is not None and not match(cache_prefix, self.prefixes):
            return False
        return job_type is None or match(job_type, self.job_types)

    def allows_reply_to(self, queue: str) -> bool:
        return any(fnmatch.fnmatchcase(queue, g) for g in self.reply_to)


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    users: dict[str, UserGrant] = Field(default_factory=dict)


class FileConfig(BaseModel):
    """The TOML file named by JLM_CONFIG: limits, job types, auth."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: Annotated[int, Field(gt=0, le=128 * 1024 * 1024)] = 1024 * 1024
    idempotency_ttl: Annotated[int, Field(gt=0)] = 86400
    allow_any_job_type: bool = True
    job_ttl: Annotated[int, Field(gt=0)] = 7 * 86400
    # A job that reached succeeded, failed or cancelled is kept this long, its history with it.
    terminal_ttl: Annotated[int, Field(gt=0)] = 86400
    # A dedup scope keeps at most this many terminal jobs; the oldest beyond it are deleted at once.
    max_history_jobs: Annotated[int, Field(gt=0)] = 100
    default_result_ttl: Annotated[int, Field(gt=0)] = 3600
    # Unconfigured job types that get a queue, per Redis namespace; more are unknown_job_type.
    max_job_types: Annotated[int, Field(gt=0)] = 1000
    # Seconds a request's requested_at may lie ahead of the daemon's clock.
    max_clock_skew: Annotated[float, Field(ge=0)] = 300.0
    # A rejected request's body is kept in jlm.dead up to this many bytes (then cut).
    dead_letter_max_bytes: Annotated[int, Field(ge=0)] = 1024 * 1024
    # jlm.dead holds at most this many bytes of bodies; the oldest are dropped first.
    dead_letter_max_length_bytes: Annotated[int, Field(gt=0)] = 1024**3
    job_types: dict[str, JobTypeConfig] = Field(default_factory=dict)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @field_validator("job_types")
    @classmethod
    def _job_type_names(cls, v: dict[str, JobTypeConfig]) -> dict[str, JobTypeConfig]:
        for name in v:
            if not NAME_RE.match(name):
                raise ValueError(f"job type name {name!r} does not match {NAME_RE.pattern}")
        return v

    def job_type(self, name: str) -> JobTypeConfig | None:
        """The job type's settings, or None if it is not accepted."""
        found = self.job_types.get(name)
        if found is not None:
            return found
        if self.allow_any_job_type:
            return JobTypeConfig(result_ttl=self.default_result_ttl)
        return None

    def queue_for(self, job_type: str) -> str:
        found = self.job_types.get(job_type)
        return found.queue if found is not None and found.queue else f"jlm.jobs.{job_type}"

    def recorded_settings(self, job_type: str) -> tuple[int, int, float, str]:
        """(max_attempts, result_ttl, retry_backoff, queue): what manage.lua records on each job
        of the type, so that a worker needs no configuration file."""
        jt = self.job_type(job_type) or JobTypeConfig(result_ttl=self.default_result_ttl)
        return jt.max_attempts, jt.result_ttl, jt.retry_backoff, self.queue_for(job_type)


class Settings(BaseModel):
    """Everything the daemon reads from its environment. Frozen; built by `load`, passed in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    redis_url: str = "redis://localhost:6379/0"
    config: Path | None = None
    metrics_addr: str = "127.0.0.1:9464"
    redis_namespace: str = "jlm"
    redis_cluster: bool = False
    # Connections to Redis (per node on a cluster); more concurrent decisions wait for one.
    redis_max_connections: Annotated[int, Field(ge=1, le=10000)] = 64
    prefetch: Annotated[int, Field(ge=1, le=65535)] = 256
    shutdown_timeout: Annotated[float, Field(gt=0)] = 15.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_verify: bool = True
    provenance_max_age: str = "7D"
    provenance_max_bytes: Annotated[int, Field(ge=0)] = 2 * 1024**3
    requests_queue_type: Literal["classic", "quorum"] = "classic"
    requests_delivery_limit: Annotated[int, Field(ge=1)] = 20
    heartbeat: Annotated[int, Field(ge=0, le=600)] = 10
    retry_max_delay: Annotated[float, Field(gt=0)] = 5.0
    lease_seconds: Annotated[float, Field(gt=0)] = 15.0
    watchdog_unready_limit: Annotated[float, Field(gt=0)] = 300.0
    worker_metrics_addr: str | None = None  # `jlm worker` serves /metrics here when set
    worker_shutdown_timeout: Annotated[float, Field(ge=0)] = 10.0  # grace for running handlers
    file: FileConfig = Field(default_factory=FileConfig)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, v: str) -> str:
        urls = [u.strip() for u in v.split(",") if u.strip()]
        if not urls:
            raise ValueError("no URL given")
        if not all(u.startswith(("amqp://", "amqps://")) for u in urls):
            raise ValueError("each URL must start with amqp:// or amqps://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("redis_namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", v):
            raise ValueError("use 1..64 letters, digits, '_', '.', '-' (no ':' or braces)")
        return v

    @field_validator("metrics_addr", "worker_metrics_addr")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")
        return v

    @field_validator("provenance_max_age")
    @classmethod
    def _max_age(cls, v: str) -> str:
        if not re.match(r"^[0-9]+(Y|M|D|h|m|s)$", v):
            raise ValueError("a RabbitMQ stream max-age such as 7D, 12h or 30m")
        return v

    @property
    def amqp_urls(self) -> list[str]:
        return [u.strip() for u in self.amqp_url.split(",") if u.strip()]

    @property
    def metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.metrics_addr.rpartition(":")
        return host.strip("[]"), int(port)


# -- loading ---------------------------------------------------------------------------------------

# The settings read from the environment, each from the variable JLM_<NAME>.
ENV_SETTINGS = tuple(name for name in Settings.model_fields if name != "file")
# The settings that hold passwords, and the systemd credential each may come from.
SECRET_CREDENTIALS = {"amqp_url": "amqp_url", "redis_url": "redis_url"}
_CONFIG_MAX_BYTES = 4 * 1024 * 1024
_SECRET_MAX_BYTES = 64 * 1024


def env_name(setting: str) -> str:
    return f"JLM_{setting.upper()}"


KNOWN_VARIABLES = frozenset(
    [env_name(n) for n in ENV_SETTINGS] + [f"{env_name(n)}_FILE" for n in SECRET_CREDENTIALS]
)


def unknown_variable(name: str) -> str:
    """The warning for a `JLM_*` variable that is not a setting, with the closest known name."""
    close = difflib.get_close_matches(name, sorted(KNOWN_VARIABLES | {"JLM_CONFIG"}), 1, 0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{name} is not a setting: ignored{hint}"


@dataclass(frozen=True)
class Source:
    """Where a value came from: `default`, `env`, `file` or `credential`, and which one."""

    kind: Literal["default", "env", "file", "credential"]
    origin: str = ""  # the variable, or the file (with the variable naming it)

    def __str__(self) -> str:
        return f"{self.kind} {self.origin}" if self.origin else self.kind


DEFAULT = Source("default")


@dataclass(frozen=True)
class Loaded:
    """The settings, where each came from (by setting name and TOML key), and the JLM_*
    variables that name no setting (a typo, or a setting of another version)."""

    settings: Settings
    sources: Mapping[str, Source]
    ignored: tuple[str, ...]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from `environ` (`os.environ` when None); ConfigError names a bad setting."""
    return load(environ).settings


def load(environ: Mapping[str, str] | None = None) -> Loaded:
    """Read the settings from `environ` alone (`os.environ` when None) and the files it names."""
    env = dict(os.environ if environ is None else environ)
    raw: dict[str, str] = {}
    sources: dict[str, Source] = {}
    for name in ENV_SETTINGS:
        found = _lookup(env, name)
        if found is None:
            sources[name] = DEFAULT
        else:
            raw[name], sources[name] = found
    if "log_level" in raw:
        raw["log_level"] = raw["log_level"].upper()
    if "log_format" in raw:
        raw["log_format"] = raw["log_format"].lower()
    try:
        # Lax validation turns the strings into bools, numbers and paths.
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, lambda loc: _label(str(loc[0]), sources))) from exc
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(settings, name)
        if path is not None:
            _check_readable(path, _label(name, sources))
    present: set[str] = set()
    if settings.config is not None:
        file, present = _load_file(settings.config)
        settings = settings.model_copy(update={"file": file})
    for key in FileConfig.model_fields:
        sources[key] = Source("file", str(settings.config)) if key in present else DEFAULT
    ignored = sorted(k for k in env if k.startswith("JLM_") and k not in KNOWN_VARIABLES)
    return Loaded(settings, sources, tuple(ignored))


def load_file(path: Path) -> FileConfig:
    """The TOML file named by JLM_CONFIG; ConfigError names the file and the bad key."""
    return _load_file(path)[0]


def _load_file(path: Path) -> tuple[FileConfig, set[str]]:
    text = _read(path, "JLM_CONFIG", _CONFIG_MAX_BYTES)
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"JLM_CONFIG: {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"JLM_CONFIG: {path} is not valid TOML: nested too deeply") from exc
    try:
        return FileConfig.model_validate(raw), set(raw)
    except ValidationError as exc:
        problems = _describe(exc, lambda loc: ".".join(map(str, loc)))
        raise ConfigError(f"JLM_CONFIG ({path}): {problems}") from exc


def _set(env: Mapping[str, str], key: str) -> str | None:
    """The variable's value, None when it is missing, empty or only white space."""
    value = env.get(key, "").strip()
    return value or None


def _lookup(env: Mapping[str, str], name: str) -> tuple[str, Source] | None:
    var = env_name(name)
    credential = SECRET_CREDENTIALS.get(name)
    if credential is not None:
        path = _set(env, f"{var}_FILE")
        if path is not None:
            return _secret(Path(path), f"{var}_FILE"), Source("file", f"{var}_FILE={path}")
        directory = _set(env, "CREDENTIALS_DIRECTORY")
        if directory is not None and os.path.exists(Path(directory) / credential):
            where = f"$CREDENTIALS_DIRECTORY/{credential}"
            return _secret(Path(directory) / credential, where), Source("credential", where)
    value = _set(env, var)
    return None if value is None else (value, Source("env", var))


def _label(name: str, sources: Mapping[str, Source]) -> str:
    """How an error names a setting: its variable, and the file its value came from."""
    source = sources.get(name, DEFAULT)
    if source.kind in ("file", "credential"):
        return f"{env_name(name)} (from {source.origin})"
    return env_name(name)


def _secret(path: Path, setting: str) -> str:
    value = _read(path, setting, _SECRET_MAX_BYTES).strip()
    if not value:
        raise ConfigError(f"{setting}: {path} is empty")
    return value


def _read(path: Path, setting: str, limit: int) -> str:
    """A file's text (at most `limit` bytes of UTF-8); ConfigError naming `setting` otherwise."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise ConfigError(f"{setting}: {path} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start
        raise ConfigError(
            f"{setting}: {path} is not UTF-8 (byte 0x{data[at]:02x} at offset {at})"
        ) from exc


def _check_readable(path: Path, setting: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _describe(exc: ValidationError, name: Callable[[tuple[int | str, ...]], str]) -> str:
    return "; ".join(f"{name(err['loc'])}: {err['msg']}" for err in exc.errors())


# -- redaction -------------------------------------------------------------------------------------

# Where the next URL of a comma-separated list begins.
_NEXT_URL = r",[A-Za-z][A-Za-z0-9+.-]*://"
# A query parameter that carries a secret: password, pass, passwd, secret, token or key, in any
# case, alone or as the end of a longer name (ssl_password, access-token, api_key).
_SECRET_PARAM = r"[?&;](?:[A-Za-z0-9.]*[_-])?(?:password|passwd|pass|secret|token|key)="
# Its value runs to the next '&', '#', white space or URL of a list, as a URL parser reads it.
_SECRET_PARAM_RE = re.compile(rf"({_SECRET_PARAM})(?:(?!{_NEXT_URL})[^&#\s])*", re.IGNORECASE)
# `scheme://user:password@`: the user may hold '@' (LDAP, e-mail names) and so may a password
# that was not percent-encoded; the password runs to the last '@' before a space or before the
# next URL of a comma-separated list (else, for one with spaces, to the next '@'). Neither the
# user nor the password runs into the next URL of a list, nor the password over a secret query
# parameter, whose value may hold an '@' of its own.
_PASSWORD_RE = re.compile(
    rf"(://(?:(?!{_NEXT_URL})[^:/\s])*:)(?:(?:(?!{_NEXT_URL}|{_SECRET_PARAM})\S)*@"
    rf"|(?:(?!{_NEXT_URL}|{_SECRET_PARAM})[^@])*@)",
    re.IGNORECASE,
)


def redact_url(text: str) -> str:
    """`text` (a URL, a list of URLs, a log line or an error holding them) with every password
    shown as `***`: the user-info password and the value of each secret query parameter.

    The one function for everything shown: check-config, logs, errors, replies and events."""
    return _SECRET_PARAM_RE.sub(r"\1***", _PASSWORD_RE.sub(r"\1***@", text))
