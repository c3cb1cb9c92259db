"""Settings from the environment: defaults, every bad value refused with the variable named, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from infinite_chat.config import ConfigError, Secret, Settings


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None  # the in-memory broker
    assert settings.history_size == 25
    assert settings.retain == 10_000
    assert settings.rate_limit == 5.0
    assert settings.rate_burst == 10
    assert settings.presence_ttl == 20.0
    assert settings.presence_refresh == 5.0
    assert settings.presence_list_max == 100
    assert settings.max_frame_bytes == 16 * 1024
    assert settings.allowed_origins == frozenset()
    assert settings.replica_name  # the host name
    assert not settings.redis_password


def test_the_limits_against_abuse_have_their_documented_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.outbox_limit, settings.outbox_limit_bytes) == (1000, 1024 * 1024)
    assert (settings.resume_max_messages, settings.resume_max_bytes) == (1000, 512 * 1024)
    assert (settings.frame_rate, settings.frame_burst) == (20.0, 60)
    assert settings.presence_interval_ms == 1000
    assert settings.sockets_per_address == 64
    assert (settings.address_bytes_per_hour, settings.address_rooms_per_hour) == (16 * 1024 * 1024, 20)


def test_an_outbox_too_small_for_a_welcome_is_refused() -> None:
    with pytest.raises(ConfigError, match="OUTBOX_LIMIT_BYTES"):
        Settings.from_env({"OUTBOX_LIMIT_BYTES": str(256 * 1024)})  # a resume can bring 512 KiB
    with pytest.raises(ConfigError, match="OUTBOX_LIMIT_BYTES"):
        Settings.from_env({"OUTBOX_LIMIT_BYTES": str(600 * 1024), "RESUME_MAX_BYTES": str(600 * 1024)})
    Settings.from_env({"OUTBOX_LIMIT_BYTES": str(600 * 1024)})  # a history is cut to RESUME_MAX_BYTES (512 KiB)


def test_values_are_read_and_typed() -> None:
    settings = Settings.from_env(
        {
            "REPLICA_NAME": "web-a",
            "REDIS_URL": "redis://redis:6379/0",
            "HISTORY_SIZE": " 50 ",
            "RATE_LIMIT": "2.5",
            "PRESENCE_TTL": "8",
            "LOG_LEVEL": "WARNING",
            "ALLOWED_ORIGINS": "https://Chat.Example.com/, http://localhost:8080 ,,",
        }
    )
    assert settings.replica_name == "web-a"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.history_size == 50
    assert settings.rate_limit == 2.5
    assert settings.presence_refresh == 2.0
    assert settings.log_level == "warning"
    assert settings.allowed_origins == {"https://chat.example.com", "http://localhost:8080"}


def test_empty_values_mean_the_default() -> None:
    settings = Settings.from_env({"HISTORY_SIZE": "", "REDIS_URL": "", "RATE_LIMIT": "  "})
    assert settings.history_size == 25
    assert settings.redis_url is None
    assert settings.rate_limit == 5.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("HISTORY_SIZE", "0"),
        ("HISTORY_SIZE", "101"),
        ("HISTORY_SIZE", "2.5"),
        ("RETAIN", "99"),
        ("RATE_LIMIT", "fast"),
        ("RATE_LIMIT", "0"),
        ("RATE_BURST", "0"),
        ("OUTBOX_LIMIT", "9"),
        ("COALESCE_MS", "-1"),
        ("PRESENCE_TTL", "1"),
        ("PRESENCE_LIST_MAX", "0"),
        ("PING_INTERVAL", "0.5"),
        ("DRAIN_SECONDS", "61"),
        ("MAX_FRAME_BYTES", "1023"),
        ("ROOM_IDLE_DAYS", "0"),
        ("LOG_LEVEL", "verbose"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(("name", "value"), [("HISTORY_SIZE", "1"), ("HISTORY_SIZE", "100"), ("RETAIN", "100")])
def test_the_bounds_themselves_are_allowed(name: str, value: str) -> None:
    Settings.from_env({name: value})


def test_the_password_file_wins_over_the_variable(tmp_path: Path) -> None:
    secret_file = tmp_path / "redis_password"
    secret_file.write_text("from-the-file\n", encoding="utf-8")
    settings = Settings.from_env({"REDIS_PASSWORD_FILE": str(secret_file), "REDIS_PASSWORD": "from-the-variable"})
    assert settings.redis_password.reveal() == "from-the-file"


def test_an_unreadable_password_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="REDIS_PASSWORD_FILE"):
        Settings.from_env({"REDIS_PASSWORD_FILE": str(tmp_path / "missing")})


def test_the_password_never_prints() -> None:
    settings = Settings.from_env({"REDIS_PASSWORD": "hunter2-very-secret"})
    assert settings.redis_password.reveal() == "hunter2-very-secret"
    for shown in (repr(settings), str(settings), repr(settings.redis_password), f"{settings.redis_password}"):
        assert "hunter2" not in shown
    assert "**" in repr(settings.redis_password)


def test_an_empty_secret_is_false_and_says_so() -> None:
    assert not Secret("")
    assert repr(Secret("")) == "Secret('')"
    assert Secret("x")
