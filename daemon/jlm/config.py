"""Settings: the environment (JLM_*), secrets from files, and the TOML file of job types."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
QUEUE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")
Policy = Literal["replace", "skip", "reuse"]
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

    def allows(self, op: str, cache_prefix: str | None, job_type: str | None) -> bool:
        def match(name: str, globs: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)

        if not match(op, self.operations):
            return False
        if cache_prefix is not None and not match(cache_prefix, self.prefixes):
            return False
        return job_type is None or match(job_type, self.job_types)


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


class Settings(BaseSettings):
    """Everything the daemon reads from its environment. Frozen; passed in explicitly."""

    model_config = SettingsConfigDict(env_prefix="JLM_", frozen=True, extra="ignore")

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


def _secret_from_file(env: Mapping[str, str], name: str, cred: str) -> str | None:
    """JLM_<NAME>_FILE, else $CREDENTIALS_DIRECTORY/<cred>; contents stripped."""
    path = env.get(f"JLM_{name}_FILE")
    setting = f"JLM_{name}_FILE"
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / cred
        if candidate.exists():
            path, setting = str(candidate), f"$CREDENTIALS_DIRECTORY/{cred}"
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc


def _describe(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}{loc.upper() if prefix == 'JLM_' else loc}: {err['msg']}")
    return "; ".join(parts)


def load_file(path: Path) -> FileConfig:
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"JLM_CONFIG: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"JLM_CONFIG: {path} is not valid TOML: {exc}") from exc
    try:
        return FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"JLM_CONFIG ({path}): {_describe(exc, '')}") from exc


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from an environment; raise ConfigError naming the bad setting."""
    env = dict(os.environ if environ is None else environ)
    overrides: dict[str, Any] = {}
    for name, cred in (("AMQP_URL", "amqp_url"), ("REDIS_URL", "redis_url")):
        secret = _secret_from_file(env, name, cred)
        if secret is not None:
            overrides[name.lower()] = secret
    secret_files = ("JLM_AMQP_URL_FILE", "JLM_REDIS_URL_FILE")
    jlm_env = {k: v for k, v in env.items() if k.startswith("JLM_") and k not in secret_files}
    try:
        # Only the given mapping is read, so tests and the CLI see exactly what they pass.
        settings = _from_mapping(jlm_env, overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "JLM_")) from exc
    for url in settings.amqp_urls:
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigError("JLM_AMQP_URL: each URL must start with amqp:// or amqps://")
    if not settings.amqp_urls:
        raise ConfigError("JLM_AMQP_URL: no URL given")
    if not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("JLM_REDIS_URL: must start with redis://, rediss:// or unix://")
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        p = getattr(settings, name)
        if p is not None and not p.is_file():
            raise ConfigError(f"JLM_{name.upper()}: {p} is not a readable file")
    if settings.config is not None:
        settings = settings.model_copy(update={"file": load_file(settings.config)})
    return settings


def _from_mapping(env: Mapping[str, str], overrides: Mapping[str, Any]) -> Settings:
    values: dict[str, Any] = {}
    fields = Settings.model_fields
    for key, value in env.items():
        name = key[4:].lower()
        if name in fields and name != "file":
            values[name] = value
    values.update(overrides)
    for optional in ("config", "tls_ca_file", "tls_cert_file", "tls_key_file"):
        if values.get(optional) == "":
            del values[optional]  # an empty variable means "not set", as in the unit file
    if isinstance(values.get("log_level"), str):
        values["log_level"] = values["log_level"].upper()
    # Lax validation turns the environment's strings into bools, numbers and paths.
    return Settings.model_validate(values)


# `scheme://user:password@`: the user may hold '@' (LDAP, e-mail names) and so may a password
# that was not percent-encoded; the password runs to the last '@' before a space or before the
# next URL of a comma-separated list (else, for one with spaces, to the next '@').
_PASSWORD_RE = re.compile(r"(://[^:/\s]*:)(?:(?:(?!,[A-Za-z][A-Za-z0-9+.-]*://)\S)*@|[^@]*@)")


def redact_url(url: str) -> str:
    """The URL (or any text holding URLs) with each password replaced: for logs, check-config."""
    return _PASSWORD_RE.sub(r"\1***@", url)
