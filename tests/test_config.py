"""Settings: contract defaults, and bad values refused at start-up with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import SettingsError, load_settings


def settings(**values: str):  # type: ignore[no-untyped-def]
    return load_settings(_env_file=None, **values)


def test_contract_defaults() -> None:
    s = settings()
    assert s.database_url == "sqlite:///./dlr.db"
    assert s.bulk_url == "https://bulk.sms-online.com/"
    assert s.media_url == "https://media.sms-online.com/upload/"
    assert s.max_callback_bytes == 65536
    assert s.callback_token is None and s.api_keys is None and s.trusted_proxies == []


def test_plain_urls_map_to_the_project_driver() -> None:
    assert settings(database_url="postgresql://u:p@h/db").sqlalchemy_url == \
        "postgresql+psycopg://u:p@h/db"
    assert settings(database_url="postgres://h/db").sqlalchemy_url == "postgresql+psycopg://h/db"
    assert settings(database_url="sqlite:////tmp/x.db").sqlalchemy_url == \
        "sqlite+pysqlite:////tmp/x.db"


def test_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLR_CALLBACK_ALLOWED_IPS", "203.0.113.0/24, 2001:db8::/32")
    monkeypatch.setenv("DLR_API_KEYS", "a,b")
    s = settings()
    assert [str(n) for n in s.callback_allowed_ips] == ["203.0.113.0/24", "2001:db8::/32"]
    assert s.api_key_values() == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DLR_MAX_CALLBACK_BYTES", "lots", "setting DLR_MAX_CALLBACK_BYTES:"),
        ("DLR_CALLBACK_ALLOWED_IPS", "10.0.0.0/33", "setting DLR_CALLBACK_ALLOWED_IPS:"),
        ("DLR_DATABASE_URL", "mysql://x/y", "setting DLR_DATABASE_URL: must start with"),
        ("DLR_CALLBACK_TOKEN", "", "setting DLR_CALLBACK_TOKEN: is set but empty"),
        ("DLR_CALLBACK_TOKEN", "   ", "setting DLR_CALLBACK_TOKEN: is set but empty"),
        ("DLR_API_KEYS", " , ", "setting DLR_API_KEYS: is set but empty"),
        ("DLR_CALLBACK_ALLOWED_IPS", "", "setting DLR_CALLBACK_ALLOWED_IPS: is set but empty"),
        ("DLR_CALLBAK_TOKEN", "typo", "unknown setting DLR_CALLBAK_TOKEN"),
    ],
)
def test_bad_settings_stop_with_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        settings()
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_secrets_do_not_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLR_API_KEYS", "very-secret-key")
    monkeypatch.setenv("DLR_CALLBACK_TOKEN", "very-secret-token")
    shown = repr(settings())
    assert "very-secret" not in shown


def test_unknown_name_in_env_file_is_worded_like_an_unknown_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DLR_DATABASE_URL=sqlite:///x.db\nDLR_CALLBAK_TOKEN=typo\n")
    with pytest.raises(SettingsError) as from_file:
        load_settings(_env_file=env_file)
    monkeypatch.setenv("DLR_CALLBAK_TOKEN", "typo")
    with pytest.raises(SettingsError) as from_env:
        settings()
    assert str(from_file.value) == str(from_env.value) == "unknown setting DLR_CALLBAK_TOKEN"


def test_known_names_in_env_file_are_read(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DLR_DATABASE_URL=sqlite:///x.db\nDLR_BATCH_MAX_SIZE=7\n")
    s = load_settings(_env_file=env_file)
    assert (s.database_url, s.batch_max_size) == ("sqlite:///x.db", 7)


def test_names_of_other_tools_in_env_file_are_left_alone(tmp_path: Path) -> None:
    # One .env often serves docker compose as well: its names are not ours to refuse.
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_PASSWORD=secret\nDLR_API_KEYS=k1,k2\n")
    assert load_settings(_env_file=env_file).api_key_values() == ["k1", "k2"]
    env_file.write_text("POSTGRES_PASSWORD=secret\nDLR_API_KEY=k1\n")
    with pytest.raises(SettingsError, match="^unknown setting DLR_API_KEY$"):
        load_settings(_env_file=env_file)
