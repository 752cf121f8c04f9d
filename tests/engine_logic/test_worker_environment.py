"""The OpenMP environment spawned workers start with: PASSIVE unless the user chose."""

from __future__ import annotations

import os

import pytest

from shardline.engine.executor import _worker_environment


def test_passive_by_default_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with _worker_environment():
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "20000")])
def test_a_users_choice_wins(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv(name, value)
    with _worker_environment():
        assert os.environ[name] == value
        assert name == "OMP_WAIT_POLICY" or "OMP_WAIT_POLICY" not in os.environ
    assert os.environ[name] == value
