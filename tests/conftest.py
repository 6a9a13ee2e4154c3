"""Shared fixtures: every test runs offline with its own Prefect database and result storage."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_session(tmp_path_factory):
    """One temporary Prefect server/database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # first start migrates a fresh DB
        yield


@pytest.fixture
def prefect_env(prefect_session, tmp_path, monkeypatch):
    """Prefect with result storage private to this test (the harness shares it otherwise)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-results")}):
        yield tmp_path
