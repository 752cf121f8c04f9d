"""The OpenMP environment worker programs start with: PASSIVE unless the user chose."""

from __future__ import annotations

import os

import pytest

from shardline.worker.launch import worker_environment


def test_passive_by_default_without_touching_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("SHARDLINE_TEST_MARKER", "kept")
    env = worker_environment()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["SHARDLINE_TEST_MARKER"] == "kept"
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "20000")])
def test_a_users_choice_wins(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv(name, value)
    env = worker_environment()
    assert env[name] == value
    assert name == "OMP_WAIT_POLICY" or "OMP_WAIT_POLICY" not in env


def test_a_given_environment_is_the_base() -> None:
    level = {"SHARDLINE_LOG_LEVEL": "INFO"}  # given here; tests/engine_logic/test_log.py covers its default
    assert worker_environment({"A": "1", **level}) == {"A": "1", "OMP_WAIT_POLICY": "PASSIVE", **level}
    assert worker_environment({"GOMP_SPINCOUNT": "0", **level}) == {"GOMP_SPINCOUNT": "0", **level}
