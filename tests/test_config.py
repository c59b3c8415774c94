"""Config: embedded defaults on loopback, a TOML file, SLM_* environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import mesh_settings, to_toml

from mesh.settings import load_settings


def test_defaults_listen_on_loopback_only() -> None:
    s = load_settings()
    hosts = {
        s.gateway.host,
        s.envoy.host,
        s.doorman.endpoint.host,
        s.inference_local.endpoint.host,
        s.ledger.endpoint.host,
    }
    assert hosts == {"127.0.0.1"}
    assert s.envoy.port == 8080


def test_toml_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = mesh_settings(tmp_path)
    path = tmp_path / "slm.toml"
    path.write_text(to_toml(written))
    monkeypatch.setenv("SLM_CONFIG", str(path))
    loaded = load_settings()
    assert loaded == written
    monkeypatch.setenv("SLM_GATEWAY__PORT", "1234")
    assert load_settings().gateway.port == 1234


def test_missing_or_invalid_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nport = -5\n")
    monkeypatch.setenv("SLM_CONFIG", str(bad))
    with pytest.raises(ValueError, match="port"):
        load_settings()
    bad.write_text("[gateway]\nunknown_key = 1\n")
    with pytest.raises(ValueError, match="unknown_key"):
        load_settings()


def test_each_doorman_replica_spools_to_a_file_of_its_own(tmp_path: Path) -> None:
    from mesh.services import BY_NAME

    settings = mesh_settings(tmp_path)
    doorman = BY_NAME["doorman"]
    spools = [doorman.replica_section(settings.doorman, k).ledger_spool for k in range(3)]
    assert spools[0] == settings.doorman.ledger_spool
    assert len(set(spools)) == 3
    assert {p.parent for p in spools} == {settings.doorman.ledger_spool.parent}
    # The same replica finds its own spool again after a restart.
    assert doorman.replica_section(settings.doorman, 2).ledger_spool == spools[2]


def test_doorman_replicas_refuse_rate_limits_each_would_count_alone() -> None:
    from doorman.config import DoormanConfig

    tenant = {"name": "acme", "key_hashes": ["0" * 64], "rpm": 60}
    with pytest.raises(ValueError, match=r"acme.*redis"):
        DoormanConfig(endpoint={"port": 50051, "metrics_port": 0, "replicas": 2}, tenants=[tenant])
    # Shared in Redis, or counted by one replica, they hold as configured.
    DoormanConfig(
        endpoint={"port": 50051, "metrics_port": 0, "replicas": 2},
        tenants=[tenant],
        limits={"backend": "redis"},
    )
    DoormanConfig(endpoint={"port": 50051, "metrics_port": 0, "replicas": 1}, tenants=[tenant])
    DoormanConfig(
        endpoint={"port": 50051, "metrics_port": 0, "replicas": 2},
        tenants=[{**tenant, "rpm": 0, "max_concurrent": 4}],
    )
