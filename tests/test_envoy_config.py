"""The Envoy bootstrap: rendered from settings with free ports, then checked by Envoy itself."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from helpers import free_port

from gateway.config import UPLOAD_OVERHEAD_BYTES, GatewayConfig
from gateway.envoy import envoy_binary, render_envoy_config
from gateway.envoy.config import EnvoyConfig
from gateway.envoy.render import GRPC_PREFIXES, parse_address, parse_addresses
from mesh.settings import Settings


def edge_settings(gateway_host: str = "127.0.0.1", doorman_host: str = "127.0.0.1") -> Settings:
    return Settings(
        gateway=GatewayConfig(
            host=gateway_host,
            port=free_port(),
            doorman=f"{doorman_host}:{free_port()}",
            max_body_bytes=64 << 10,
        ),
        envoy=EnvoyConfig(
            port=free_port(),
            admin_port=free_port(),
            max_body_bytes=64 << 10,
            stream_idle_timeout_s=45,
        ),
    )


def validate(settings: Settings, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "envoy.yaml"
    config.write_text(render_envoy_config(*_edge(settings)))
    return subprocess.run(
        [envoy_binary(settings.envoy), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    result: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return result


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    clusters: dict[str, dict[str, Any]] = {
        c["name"]: c for c in config["static_resources"]["clusters"]
    }
    return clusters[name]


def endpoint(config: dict[str, Any], name: str) -> dict[str, Any]:
    found = cluster(config, name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    result: dict[str, Any] = found["endpoint"]["address"]["socket_address"]
    return result


@pytest.mark.parametrize(
    ("gateway_host", "doorman_host"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "localhost")],
    ids=["loopback", "wildcard-and-name"],
)
def test_envoy_accepts_the_rendered_config(
    tmp_path: Path, gateway_host: str, doorman_host: str
) -> None:
    result = validate(edge_settings(gateway_host, doorman_host), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "OK" in result.stdout + result.stderr


def test_envoy_refuses_a_broken_config(tmp_path: Path) -> None:
    # Guards the test above: validate mode must actually reject something.
    settings = edge_settings()
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_envoy_config(*_edge(settings)).replace("max_request_bytes", "max_bytes")
    )
    result = subprocess.run(
        [envoy_binary(settings.envoy), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0


def test_addresses_and_limits_come_from_settings() -> None:
    settings = edge_settings()
    config = yaml.safe_load(render_envoy_config(*_edge(settings)))
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": settings.envoy.admin_port,
    }
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": settings.envoy.host, "port_value": settings.envoy.port}
    assert endpoint(config, "gateway") == {
        "address": "127.0.0.1",
        "port_value": settings.gateway.port,
    }
    doorman_port = int(settings.gateway.doorman.rsplit(":", 1)[1])
    assert endpoint(config, "doorman") == {"address": "127.0.0.1", "port_value": doorman_port}
    hcm = manager(config)
    assert hcm["generate_request_id"] is True
    assert hcm["stream_idle_timeout"] == "45s"
    buffer = hcm["http_filters"][0]
    assert buffer["name"] == "envoy.filters.http.buffer"
    assert buffer["typed_config"]["max_request_bytes"] == settings.envoy.max_body_bytes
    # Uploads to /v1/files are bounded by the gateway's file limit instead.
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (uploads,) = [r for r in routes if r["match"].get("path") == "/v1/files"]
    override = uploads["typed_per_filter_config"]["envoy.filters.http.buffer"]["buffer"]
    assert override["max_request_bytes"] == (
        settings.gateway.max_file_bytes + UPLOAD_OVERHEAD_BYTES
    )
    assert routes.index(uploads) < [r["match"].get("prefix") for r in routes].index("/")
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert hcm["access_log"][0]["name"] == "envoy.access_loggers.stdout"
    # Envoy's own 413 reads like the gateway's: OpenAI's error shape.
    too_large = hcm["local_reply_config"]["mappers"][0]
    assert too_large["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 413
    error = too_large["body_format_override"]["json_format"]["error"]
    assert error["type"] == "invalid_request_error"


def test_grpc_goes_to_the_doorman_over_http2_unbuffered() -> None:
    config = yaml.safe_load(render_envoy_config(*_edge(edge_settings())))
    routes = manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    by_prefix = {r["match"]["prefix"]: r for r in routes if "prefix" in r["match"]}
    for prefix in GRPC_PREFIXES:
        route = by_prefix[prefix]
        assert route["route"]["cluster"] == "doorman"
        assert route["route"]["timeout"] == "0s"
        per_filter = route["typed_per_filter_config"]["envoy.filters.http.buffer"]
        assert per_filter["disabled"] is True
    # The catch-all comes last, so it cannot shadow the gRPC prefixes.
    assert routes[-1]["match"]["prefix"] == "/"
    assert routes[-1]["route"]["cluster"] == "gateway"
    assert routes[-1]["route"]["timeout"] == "0s"
    options = cluster(config, "doorman")["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    gateway = cluster(config, "gateway")["typed_extension_protocol_options"]
    gateway_http = gateway["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in gateway_http["explicit_http_config"]


def test_names_are_resolved_and_ips_are_static() -> None:
    config = yaml.safe_load(
        render_envoy_config(*_edge(edge_settings(doorman_host="doorman.slm.svc")))
    )
    assert cluster(config, "doorman")["type"] == "STRICT_DNS"
    assert cluster(config, "gateway")["type"] == "STATIC"


def endpoints(config: dict[str, Any], name: str) -> list[tuple[str, int]]:
    found = cluster(config, name)["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in found
    ]


def test_every_doorman_replica_is_an_endpoint(tmp_path: Path) -> None:
    settings = edge_settings()
    ports = [free_port(), free_port(), free_port()]
    settings.gateway.doorman = ",".join(f"127.0.0.1:{p}" for p in ports)
    config = yaml.safe_load(render_envoy_config(*_edge(settings)))
    doorman = cluster(config, "doorman")
    assert endpoints(config, "doorman") == [("127.0.0.1", p) for p in ports]
    assert (doorman["type"], doorman["lb_policy"]) == ("STATIC", "ROUND_ROBIN")
    # A Doorman that is down or draining leaves the rotation through its gRPC health check.
    assert "grpc_health_check" in doorman["health_checks"][0]
    result = validate(settings, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


def test_one_name_among_the_doormen_resolves_them_all(tmp_path: Path) -> None:
    settings = edge_settings()
    settings.gateway.doorman = f"127.0.0.1:{free_port()},localhost:{free_port()}"
    config = yaml.safe_load(render_envoy_config(*_edge(settings)))
    assert cluster(config, "doorman")["type"] == "STRICT_DNS"
    assert [h for h, _ in endpoints(config, "doorman")] == ["127.0.0.1", "localhost"]
    assert validate(settings, tmp_path).returncode == 0
    # One Doorman needs no health check: Envoy would route to it anyway (panic threshold).
    single = yaml.safe_load(render_envoy_config(*_edge(edge_settings())))
    assert "health_checks" not in cluster(single, "doorman")


def test_every_gateway_replica_is_an_endpoint(tmp_path: Path) -> None:
    settings = edge_settings()
    port = 1024 + free_port() % 40000  # not bound: Envoy only validates the file
    settings.gateway = GatewayConfig(
        **{**settings.gateway.model_dump(), "port": port, "replicas": 3}
    )
    config = yaml.safe_load(render_envoy_config(*_edge(settings)))
    for name in ("gateway", "gateway_generation"):
        found = cluster(config, name)
        assert endpoints(config, name) == [("127.0.0.1", port + 100 * k) for k in range(3)]
        assert (found["type"], found["lb_policy"]) == ("STATIC", "LEAST_REQUEST")
        # A gateway that is down leaves the rotation; its liveness, not the Doorman's state.
        assert found["health_checks"][0]["http_health_check"] == {"path": "/healthz"}
    assert validate(settings, tmp_path).returncode == 0
    single = yaml.safe_load(render_envoy_config(*_edge(edge_settings())))
    assert "health_checks" not in cluster(single, "gateway")


def test_gateway_replicas_need_ports_of_their_own() -> None:
    assert GatewayConfig(port=8000, replicas=3).addresses == [
        "127.0.0.1:8000",
        "127.0.0.1:8100",
        "127.0.0.1:8200",
    ]
    with pytest.raises(ValueError, match="needs a port"):
        GatewayConfig(port=0, replicas=2)
    with pytest.raises(ValueError, match="above 65535"):
        GatewayConfig(port=65500, replicas=2)
    with pytest.raises(ValueError, match="replica 2 of 2"):
        GatewayConfig(port=8000, replicas=2).replica(2)


@pytest.mark.parametrize("addresses", ["127.0.0.1:1,", ",127.0.0.1:1", "127.0.0.1:1,,h:2"])
def test_an_empty_doorman_entry_is_refused(addresses: str) -> None:
    with pytest.raises(ValueError, match="empty entry"):
        parse_addresses(addresses)


def test_wildcard_bind_is_dialled_on_loopback() -> None:
    config = yaml.safe_load(render_envoy_config(*_edge(edge_settings(gateway_host="0.0.0.0"))))
    assert endpoint(config, "gateway")["address"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("doorman:7", "doorman", 7),
        ("[::1]:50051", "::1", 50051),
        ("0.0.0.0:1", "127.0.0.1", 1),
    ],
)
def test_parse_address(address: str, host: str, port: int) -> None:
    parsed = parse_address(address)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize("address", ["doorman", "doorman:", "doorman:http", "h:0", "h:70000"])
def test_parse_address_refuses_garbage(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        parse_address(address)


def test_binary_comes_from_settings_or_the_wheel() -> None:
    assert envoy_binary(EnvoyConfig(binary="/opt/envoy")) == "/opt/envoy"
    wheel_binary = Path(envoy_binary(EnvoyConfig()))
    assert wheel_binary.is_file()


def _edge(settings: Settings) -> tuple[GatewayConfig, EnvoyConfig]:
    return settings.gateway, settings.envoy
