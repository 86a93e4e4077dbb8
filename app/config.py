"""Settings, read once from the environment or `.env` (prefix `DLR_`).

Bad values stop start-up with one line naming the setting, rather than failing on the
first request. A security setting that is present but empty is refused: an empty token or
allow-list must never silently open the door.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from typing import Annotated, Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ENV_PREFIX = "DLR_"


class SettingsError(ValueError):
    """A setting is unknown or malformed; the message is one line naming it."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _OwnNamesOnly(PydanticBaseSettingsSource):
    """The .env source without names that are not ours: one .env often serves docker
    compose too (POSTGRES_PASSWORD=...), and such a name must not stop start-up. Unknown
    DLR_ names still do."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner().items()
                if k in self.settings_cls.model_fields or k.upper().startswith(ENV_PREFIX)}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="forbid", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _OwnNamesOnly(dotenv_settings), file_secret_settings

    database_url: str = "sqlite:///./dlr.db"
    callback_token: SecretStr | None = None
    callback_allowed_ips: Annotated[list[IPNetwork] | None, NoDecode] = None
    trusted_proxies: Annotated[list[IPNetwork], NoDecode] = Field(default_factory=list)
    api_keys: Annotated[list[SecretStr] | None, NoDecode] = None
    bulk_url: str = "https://bulk.sms-online.com/"
    media_url: str = "https://media.sms-online.com/upload/"
    bulk_user: str | None = None
    bulk_secret_key: SecretStr | None = None
    bulk_from: str | None = None
    max_callback_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    callback_read_timeout: float = Field(default=10.0, gt=0, le=300)

    # Beyond the contract: knobs an operator may need, all with safe defaults.
    db_timeout: float = Field(default=5.0, gt=0, le=300)
    # A body sent to /api/* (a send, an image upload) must arrive within this many seconds.
    api_read_timeout: float = Field(default=60.0, gt=0, le=3600)
    batch_max_size: int = Field(default=500, ge=1, le=5000)
    # The write path's database work in a child process (app/store/writer_process.py) rather than
    # a thread of the server's: off, for a debugger or a test that patches the write path.
    writer_process: bool = True
    send_max_retries: int = Field(default=3, ge=0, le=10)
    send_backoff: float = Field(default=1.0, ge=0, le=60)
    send_timeout: float = Field(default=30.0, gt=0, le=600)
    upload_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)  # the public docs: 10 MB
    upload_sign_uppercase: bool = False
    restrict_metrics: bool = False
    restrict_docs: bool = False

    # Forwarding (outbound webhooks). The secret comes before the URL so that the URL's
    # validator can insist on it.
    forward_secret: SecretStr | None = None
    forward_url: str | None = None
    forward_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0])
    forward_timeout: float = Field(default=10.0, gt=0, le=300)
    forward_concurrency: int = Field(default=8, ge=1, le=256)

    # The spool (app/store/spool.py): where callbacks are kept while PostgreSQL is away, and
    # how large it may grow (past it: 503). Unused on SQLite.
    spool_path: str = "./dlr-spool.db"
    spool_max_bytes: int = Field(default=1024 ** 3, ge=1024 * 1024)

    # Campaigns: a regular expression with a group named `campaign` that derives the label
    # of a message known only from DLRs from its p_transaction_id (unset: no label).
    campaign_pattern: str | None = None

    @field_validator("callback_allowed_ips", "trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list):
            return [ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v
                    for v in value]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("callback_token", "bulk_secret_key")
    @classmethod
    def _not_blank_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty; unset it or give it a value")
        return value

    @field_validator("callback_allowed_ips", "api_keys")
    @classmethod
    def _not_empty_list(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and not value:
            raise ValueError("is set but empty; unset it or give it a value")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in {"sqlite", "postgresql", "postgres"}:
            raise ValueError("must start with sqlite:/// or postgresql://")
        return value

    @field_validator("forward_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        from app.core.webhook_signing import secret_key

        if value is not None:
            secret_key(value.get_secret_value())  # raises ValueError with the reason
        return value

    @field_validator("forward_url")
    @classmethod
    def _forward_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        from app.core.targets import check_url

        if value is None:
            return None
        if info.data.get("forward_secret") is None:
            raise ValueError("needs DLR_FORWARD_SECRET (a whsec_ secret) beside it")
        return check_url(value)

    @field_validator("forward_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        value = _split_csv(value)
        if isinstance(value, list) and not value:
            raise ValueError("is set but empty; give the retry delays in seconds, e.g. 5,300")
        return value

    @field_validator("forward_retry_schedule")
    @classmethod
    def _schedule_range(cls, value: list[float]) -> list[float]:
        if any(not 0 <= v <= 7 * 86400 for v in value):
            raise ValueError("each delay must be between 0 and 604800 seconds")
        return value

    @field_validator("campaign_pattern")
    @classmethod
    def _campaign_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a regular expression: {exc}") from None
        if "campaign" not in compiled.groupindex:
            raise ValueError("needs a group named campaign, e.g. ^(?P<campaign>.+)-[0-9]+$")
        return value

    @field_validator("spool_path")
    @classmethod
    def _spool_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is set but empty; give the file the spool is kept in")
        return value

    @property
    def spool_file(self) -> str | None:
        """The spool's file, on PostgreSQL; None on SQLite (the local disk already)."""
        return None if self.is_sqlite else self.spool_path

    @property
    def campaign_regex(self) -> re.Pattern[str] | None:
        return re.compile(self.campaign_pattern) if self.campaign_pattern else None

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_env(cls, data: Any) -> Any:
        known = {f"{ENV_PREFIX}{name}".upper() for name in cls.model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX)
                         and k.upper() not in known)
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]}")
        return data

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with the driver this project uses (plain URLs are mapped)."""
        url = self.database_url
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain):]
        if url.startswith("sqlite://"):
            return "sqlite+pysqlite://" + url[len("sqlite://"):]
        return url

    @property
    def libpq_url(self) -> str:
        """The PostgreSQL URL as libpq takes it (for the async read pool)."""
        return "postgresql://" + self.sqlalchemy_url.split("://", 1)[1]

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def api_key_values(self) -> list[str]:
        return [k.get_secret_value() for k in self.api_keys or []]


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning a validation failure into one clear line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            # A name from .env arrives whole (`dlr_foo`), not as a field name: report it as
            # written, in the same words as an unknown environment variable.
            raise SettingsError(f"unknown setting {loc.upper()}") from None
        name = f"{ENV_PREFIX}{loc}".upper() if loc else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("unknown setting"):
            raise SettingsError(msg) from None
        raise SettingsError(f"setting {name}: {msg}") from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
