"""The Helm chart: lint and render with Helm's engine, validate every object, check the wiring."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel

from gateway.envoy import envoy_binary
from gateway.envoy.config import EnvoyConfig
from mesh.cli import main as cli_main
from mesh.settings import Settings
from slm.discovery import KubernetesResolver

CHART = Path(__file__).parent.parent / "charts" / "service-slm"
VALUE_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "rel", "llm"
# The chart's minimum (Chart.yaml kubeVersion) and the newest schemas kubernetes-validate has.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("policy.sigstore.dev/v1beta1", "ClusterImagePolicy"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}
# Config keys the chart writes for components whose settings have not landed in
# services/slm/config.py yet; any other unknown key is a chart bug and fails the test.
PENDING_CONFIG_KEYS: set[str] = set()
# Values the pods take from Secrets at run time, standing in for them when the config is checked.
FROM_SECRET = "postgresql://from-secret@db/slm"
# Charted by the dashboard, registered once inference-local measures them.
PENDING_METRICS: set[str] = set()
Obj = dict[str, Any]


def values_of(name: str) -> Obj:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


@cache
def _render(name: str) -> tuple[Obj, ...]:
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values_of(name), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Obj] = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return tuple(objects)


def render(name: str) -> list[Obj]:
    return list(_render(name))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def full(component: str) -> str:
    return f"{RELEASE}-service-slm-{component}"


def mesh_config(objects: list[Obj]) -> Obj:
    config_map = named(objects, "ConfigMap", full("config"))
    return tomllib.loads(config_map["data"]["slm.toml"])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def containers(objects: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [
        (d, c)
        for d in of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"].get("initContainers", [])
        + d["spec"]["template"]["spec"]["containers"]
    ]


# --- lint, schema, Kubernetes validation ---------------------------------------------------


@pytest.mark.parametrize("name", VALUE_FILES)
def test_chart_lints_clean(name: str) -> None:
    report = helm.lint(CHART, values_of(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational (e.g. "icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_FILES)
def test_every_rendered_object_validates_against_kubernetes_schemas(name: str) -> None:
    objects = render(name)
    assert len(objects) > 20
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_value_files_cover_each_deployment_shape() -> None:
    assert VALUE_FILES == [
        "cpu-only-values.yaml",
        "default-values.yaml",
        "external-tier-values.yaml",
        "gpu-vllm-values.yaml",
        "signed-images-values.yaml",
        "tiered-manifest-values.yaml",
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"ledger": {"backend": "postgresql"}}, "existingSecret"),
        ({"vllm": {"enabled": True, "pools": [{"name": "a", "model": "m"}]}}, "existingClaim"),
        ({"doorman": {"prot": 1}}, "prot"),
        ({"inferenceLocal": {"variant": "rocm"}}, "variant"),
    ],
)
def test_schema_refuses_bad_values(values: Obj, message: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)


def test_every_value_is_documented() -> None:
    """helm-docs' rule: a "# --" comment above each leaf, or above a map documented whole."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_above: list[int] = []  # indents of ancestor keys documented as a whole
    leaves = 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        documented_above = [d for d in documented_above if d < indent]
        block = i - 1
        while (
            block > 0
            and lines[block - 1].strip().startswith("#")
            and not lines[block].strip().startswith("# --")
        ):
            block -= 1
        above = lines[block].strip()
        following = next((n for n in lines[i + 1 :] if n.strip()), "")
        has_children = (len(following) - len(following.lstrip())) > indent and stripped.endswith(
            ":"
        )
        if above.startswith("# --"):
            leaves += 1
            if has_children:
                documented_above.append(indent)
        elif above.startswith("#") and documented_above:
            continue
        else:
            assert has_children or documented_above, (
                f"values.yaml:{i + 1} {stripped!r} undocumented"
            )
    assert leaves >= 100


# --- conventions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_FILES)
def test_selectors_are_name_and_instance_only(name: str) -> None:
    objects = render(name)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(objects, "Deployment")
    }
    for deployment in of_kind(objects, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert matches(selector, pods[deployment["metadata"]["name"]])
        assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for service in of_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
        # Each Service selects the pods of exactly one Deployment, its own.
        selected = [n for n, labels in pods.items() if matches(selector, labels)]
        assert selected == [service["metadata"]["name"]]
    for budget in of_kind(objects, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert [n for n, labels in pods.items() if matches(selector, labels)] == [
            budget["metadata"]["name"]
        ]


@pytest.mark.parametrize("name", VALUE_FILES)
def test_images_are_pinned(name: str) -> None:
    objects = render(name)
    pods = [d["spec"]["template"]["spec"] for d in of_kind(objects, "Deployment")]
    pods += [p["spec"] for p in of_kind(objects, "Pod")]
    for pod in pods:
        for container in pod["containers"]:
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository, image
            assert "/" not in tag, f"{image} has no tag"
            assert tag not in ("", "latest"), image


@pytest.mark.parametrize("name", VALUE_FILES)
def test_grpc_services_are_probed_through_grpc_health(name: str) -> None:
    probed = 0
    for deployment, container in containers(render(name)):
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if "grpc" not in ports:
            continue
        probed += 1
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": ports["grpc"]}, deployment["metadata"][
                "name"
            ]
        # Never runs as root.
        security = deployment["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert probed >= 3


def _startup_budget_s(container: Obj) -> int:
    probe = container["startupProbe"]
    return int(probe["periodSeconds"]) * int(probe["failureThreshold"])


@pytest.mark.parametrize("name", VALUE_FILES)
def test_startup_probes_allow_for_model_loading(name: str) -> None:
    values = values_of(name)
    for deployment, container in containers(render(name)):
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "inference-local":
            assert _startup_budget_s(container) >= 600
            # Liveness only starts after the startup probe: a loading model is never killed.
            assert (
                container["livenessProbe"]["failureThreshold"]
                * container["livenessProbe"]["periodSeconds"]
                < 600
            )
        elif component.startswith("vllm-"):
            assert _startup_budget_s(container) >= 1800
    if values.get("vllm", {}).get("enabled"):
        assert any(
            d["metadata"]["name"].startswith(full("vllm-")) for d, _ in containers(render(name))
        )


# --- wiring --------------------------------------------------------------------------------


def _known(model: type[BaseModel], data: Obj, prefix: str, dropped: set[str]) -> Obj:
    """`data` without keys `model` does not define yet, which are collected in `dropped`."""
    kept: Obj = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            dropped.add(path)
            continue
        annotation = field.annotation
        if (
            isinstance(value, dict)
            and isinstance(annotation, type)
            and issubclass(annotation, BaseModel)
        ):
            kept[key] = _known(annotation, value, f"{path}.", dropped)
        else:
            kept[key] = value
    return kept


@pytest.mark.parametrize("name", VALUE_FILES)
def test_every_slm_container_loads_the_config_with_its_own_secrets_only(
    name: str, tmp_path: Path
) -> None:
    # A section one pod's Secret completes (the ledger's DSN) must not stop the others
    # starting: each loads the whole file with only the environment its own pod is given.
    objects = render(name)
    config = tmp_path / "slm.toml"
    config.write_text(named(objects, "ConfigMap", full("config"))["data"]["slm.toml"])
    checked = 0
    for _, container in containers(objects):
        env = {e["name"]: e for e in container.get("env", [])}
        if "SLM_CONFIG" not in env:
            continue
        own = {
            key: "0" * 64 if key.lower().endswith("sha256") else FROM_SECRET
            for key in env
            if key != "SLM_CONFIG"
        }
        with pytest.MonkeyPatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("SLM_")]:
                patch.delenv(key)
            for key, value in own.items():
                patch.setenv(key, value)
            patch.setenv("SLM_CONFIG", str(config))
            Settings()
        checked += 1
    assert checked >= 5


def _service_port(objects: list[Obj], address: str) -> tuple[Obj, int]:
    host, _, port = address.rpartition(":")
    service = named(objects, "Service", host)
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    # The port the Service forwards to is the one the selected pods listen on.
    deployment = named(objects, "Deployment", host)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (target,) = [p for p in container["ports"] if p["name"] == entry["targetPort"]]
    return service, int(target["containerPort"])


@pytest.mark.parametrize("name", VALUE_FILES)
def test_rendered_config_is_valid_and_names_the_charts_services(name: str) -> None:
    objects = render(name)
    raw = mesh_config(objects)
    # Settings from Secrets arrive as SLM_SECTION__KEY environment variables; they must name
    # real settings too.
    for _, container in containers(objects):
        for env in container.get("env", []):
            if env["name"].startswith("SLM_") and env["name"] != "SLM_CONFIG":
                assert "secretKeyRef" in env["valueFrom"]
                *path, leaf = env["name"].removeprefix("SLM_").lower().split("__")
                section = raw
                for key in path:
                    section = section.setdefault(key, {})
                section[leaf] = "0" * 64 if leaf.endswith("sha256") else FROM_SECRET
    dropped: set[str] = set()
    settings = Settings.model_validate(_known(Settings, raw, "", dropped))
    assert dropped <= PENDING_CONFIG_KEYS, dropped - PENDING_CONFIG_KEYS

    doorman = settings.doorman
    for address, component in (
        (doorman.inference_local, "inference-local"),
        (doorman.ledger, "ledger"),
        (settings.gateway.doorman, "doorman"),
        (settings.gateway.ledger, "ledger"),
    ):
        service, container_port = _service_port(objects, address)
        assert service["metadata"]["name"] == full(component)
        # The component's config binds exactly the port its container declares.
        attribute = {"inference-local": "inference_local"}.get(component, component)
        assert getattr(settings, attribute).endpoint.port == container_port
        assert getattr(settings, attribute).endpoint.host == "0.0.0.0"
        # Headless, so gRPC's DNS resolver balances over every pod.
        assert service["spec"]["clusterIP"] == "None"

    # Discovery turns those names into in-namespace DNS names the cluster resolves.
    assert settings.discovery.mode == "kubernetes"
    resolver = KubernetesResolver(settings.discovery.namespace, settings.discovery.cluster_domain)
    assert (
        resolver.resolve(doorman.ledger)
        == f"dns:///{full('ledger')}.{NAMESPACE}.svc.cluster.local:50056"
    )

    # Every route the chart writes leads to the inference-remote Service it creates.
    for route in doorman.routing.routes:
        for step in route.chain:
            service, port = _service_port(objects, step.upstream)
            assert service["metadata"]["name"] == full("inference-remote")
            assert settings.inference_remote.endpoint.port == port


def test_vllm_pools_are_wired_as_tier_b_upstreams() -> None:
    objects = render("gpu-vllm-values.yaml")
    config = mesh_config(objects)
    models = config["inference_remote"]["models"]
    assert [m["name"] for m in models] == ["gemma-3-4b", "llama-3.3-70b"]
    assert [r["model"] for r in config["doorman"]["routing"]["routes"]] == [
        "gemma-3-4b",
        "llama-3.3-70b",
    ]
    upstreams = [u for m in models for u in m["upstreams"]]
    assert [u["kind"] for u in upstreams] == ["vllm", "vllm"]
    for upstream in upstreams:
        host_port = upstream["url"].removeprefix("http://").removesuffix("/v1")
        service, port = _service_port(objects, host_port)
        assert service["metadata"]["name"] == full(f"vllm-{upstream['name']}")
        assert port == 8000
    large = named(objects, "Deployment", full("vllm-large"))["spec"]["template"]["spec"]
    (vllm,) = large["containers"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "--tensor-parallel-size=4" in vllm["args"]
    assert large["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert large["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in large["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "vllm-models"
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LMCACHE_REMOTE_URL"].startswith("mooncakestore://")
    # inference-local on CUDA asks for its GPU and uses the CUDA image.
    local = named(objects, "Deployment", full("inference-local"))["spec"]["template"]["spec"]
    assert local["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert local["containers"][0]["image"].endswith("-cuda")


def test_ledger_on_postgresql_and_rate_limits_and_cache_in_redis_come_from_existing_secrets() -> (
    None
):
    objects = render("gpu-vllm-values.yaml")
    assert not [
        c
        for c in of_kind(objects, "PersistentVolumeClaim")
        if c["metadata"]["name"] == full("ledger")
    ]
    ledger = named(objects, "Deployment", full("ledger"))["spec"]
    assert ledger["replicas"] == 2
    env = {e["name"]: e for e in ledger["template"]["spec"]["containers"][0]["env"]}
    assert env["SLM_LEDGER__POSTGRES_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "slm-ledger-postgres",
        "key": "dsn",
    }
    doorman = named(objects, "Deployment", full("doorman"))["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e for e in doorman["env"]}
    assert env["SLM_DOORMAN__LIMITS__REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "slm-redis"
    assert mesh_config(objects)["doorman"]["limits"]["backend"] == "redis"
    # The result cache shares the Redis, so the Doorman replicas share their answers.
    assert (
        env["SLM_DOORMAN__CACHE__REDIS_URL"]["valueFrom"]
        == env["SLM_DOORMAN__LIMITS__REDIS_URL"]["valueFrom"]
    )
    assert mesh_config(objects)["doorman"]["cache"]["backend"] == "redis"


def test_sqlite_ledger_has_one_writer_on_a_kept_volume() -> None:
    objects = render("default-values.yaml")
    claim = named(objects, "PersistentVolumeClaim", full("ledger"))
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ledger = named(objects, "Deployment", full("ledger"))["spec"]
    assert ledger["replicas"] == 1
    assert ledger["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("name", VALUE_FILES)
def test_envoy_runs_the_meshs_own_bootstrap_on_the_charts_services(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(name)
    # Every example deploys the edge; one that did not would fail here, not pass unseen.
    pod = named(objects, "Deployment", full("envoy"))["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (envoy,) = pod["containers"]
    # The init container writes what Envoy reads, from the mesh config the other pods read.
    assert init["args"][0] == "envoy-config"
    out = Path(init["args"][init["args"].index("--out") + 1])
    assert ["-c", str(out)] == envoy["args"][:2]
    (written,) = [m for m in init["volumeMounts"] if out.is_relative_to(m["mountPath"])]
    (read,) = [m for m in envoy["volumeMounts"] if m["mountPath"] == written["mountPath"]]
    assert read["name"] == written["name"]
    assert read["readOnly"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == written["name"]]
    assert "emptyDir" in volume

    # What the init container runs, on the chart's config: the bootstrap `slm up` runs.
    config = tmp_path / "slm.toml"
    config.write_text(named(objects, "ConfigMap", full("config"))["data"]["slm.toml"])
    rendered = tmp_path / "envoy.yaml"
    # `--config` sets $SLM_CONFIG for the process; restored when the test ends.
    monkeypatch.setenv("SLM_CONFIG", str(config))
    assert cli_main(["--config", str(config), "envoy-config", "--out", str(rendered)]) == 0
    bootstrap = yaml.safe_load(rendered.read_text())
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    ports = {"gateway": 8000, "doorman": 50051}
    for cluster in ("gateway", "gateway_generation", "doorman", "doorman_generation"):
        component = cluster.removesuffix("_generation")
        (endpoint,) = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {
            "address": f"{full(component)}.{NAMESPACE}.svc.cluster.local",
            "port_value": ports[component],
        }
        assert clusters[cluster]["type"] == "STRICT_DNS"
    limit = values_of(name).get("envoy", {}).get("maxConcurrentRequests", 64)
    for cluster in ("gateway_generation", "doorman_generation"):
        (thresholds,) = clusters[cluster]["circuit_breakers"]["thresholds"]
        assert thresholds["max_requests"] == limit
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    refusals = [m for m in manager["local_reply_config"]["mappers"] if m.get("status_code") == 429]
    assert refusals, "the edge answers a full generation cluster with 429"
    result = subprocess.run(
        [envoy_binary(EnvoyConfig()), "--mode", "validate", "-c", str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hpas_scale_gateway_and_doorman() -> None:
    objects = render("default-values.yaml")
    targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert targets == {full("gateway"), full("doorman")}
    for target in targets:
        # The HPA owns the replica count; the Deployment must not fight it.
        assert "replicas" not in named(objects, "Deployment", target)["spec"]


# --- network policy ------------------------------------------------------------------------


def _egress_allowed(policies: list[Obj], pod_labels: dict[str, str], ip: str, port: int) -> bool:
    """Whether some policy selecting the pod allows egress to an address outside the cluster."""
    selecting = [
        p for p in policies if matches(p["spec"]["podSelector"].get("matchLabels", {}), pod_labels)
    ]
    assert selecting, f"no policy selects {pod_labels}"
    address = ipaddress.ip_address(ip)
    for policy in selecting:
        if "Egress" not in policy["spec"]["policyTypes"]:
            continue
        for rule in policy["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("to")
            if not peers:
                return True  # A rule with no peers allows every destination.
            for peer in peers:
                block = peer.get("ipBlock")
                if block is None:
                    continue  # Pod and namespace selectors match pods, never an external IP.
                inside = address in ipaddress.ip_network(block["cidr"])
                excluded = any(address in ipaddress.ip_network(e) for e in block.get("except", []))
                if inside and not excluded:
                    return True
    return False


@pytest.mark.parametrize("name", VALUE_FILES)
def test_only_inference_remote_may_leave_the_cluster(name: str) -> None:
    objects = render(name)
    policies = of_kind(objects, "NetworkPolicy")
    remote_has_external = bool(
        values_of(name).get("inferenceRemote", {}).get("external", {}).get("upstreams")
    )
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        public = _egress_allowed(policies, labels, "203.0.113.10", 443)
        assert public == (component == "inference-remote" and remote_has_external), component
        # Nobody reaches arbitrary ports outside, nor private hosts on HTTPS.
        assert not _egress_allowed(policies, labels, "203.0.113.10", 22)
        assert not _egress_allowed(policies, labels, "10.9.8.7", 443)


def test_default_deny_covers_every_pod() -> None:
    objects = render("gpu-vllm-values.yaml")
    deny = named(objects, "NetworkPolicy", full("default-deny"))["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    assert "egress" not in deny
    for deployment in of_kind(objects, "Deployment"):
        assert matches(
            deny["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"]
        )


def test_external_api_keys_are_mounted_from_secrets() -> None:
    objects = render("external-tier-values.yaml")
    remote = named(objects, "Deployment", full("inference-remote"))["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in remote["volumes"] if "secret" in v}
    assert secrets == {"slm-openai", "slm-mistral"}
    remote_config = mesh_config(objects)["inference_remote"]
    upstreams = [u for m in remote_config["models"] for u in m["upstreams"]]
    assert {u["api_key_file"] for u in upstreams} == {
        "/etc/slm/external/openai/api-key",
        "/etc/slm/external/mistral/api-key",
    }
    assert remote_config["external_allowlist"] == ["api.openai.com", "api.mistral.ai"]
    # The key pepper reaches the Doorman from its Secret, never through the ConfigMap.
    doorman = named(objects, "Deployment", full("doorman"))["spec"]["template"]["spec"]
    env = {e["name"]: e for e in doorman["containers"][0]["env"]}
    assert env["SLM_DOORMAN__KEY_PEPPER"]["valueFrom"]["secretKeyRef"]["name"] == "slm-key-pepper"


def test_client_api_keys_become_a_secret_and_tenant_hashes() -> None:
    objects = render("cpu-only-values.yaml")
    secret = named(objects, "Secret", full("api-keys"))
    keys = [base64.b64decode(secret["data"][k]).decode() for k in ("key-0", "key-1")]
    assert keys == ["sk-test-one", "sk-test-two"]
    (tenant,) = mesh_config(objects)["doorman"]["tenants"]
    # The Doorman sees only digests, as doorman.tenants documents: SHA-256 without a pepper.
    assert tenant["key_hashes"] == [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    assert "sk-test-one" not in named(objects, "ConfigMap", full("config"))["data"]["slm.toml"]


def test_the_doorman_requires_a_tenant_off_loopback() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError, match=r"auth\.keys or auth\.tenants is required"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE)


# --- model manifest ------------------------------------------------------------------------

KEYS: Obj = {"auth": {"keys": ["sk-ci-default-key"]}}


def render_with(values: Obj) -> list[Obj]:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def _local(values: Obj) -> Obj:
    return {**KEYS, "inferenceLocal": values}


def test_a_tiered_manifest_reaches_inference_local_and_the_doorman() -> None:
    settings = Settings.model_validate(mesh_config(render("tiered-manifest-values.yaml")))
    local = settings.inference_local
    models = {m.name: m for m in local.models}
    assert {n: m.tier for n, m in models.items()} == {
        "router": "resident",
        "coder": "standby",
        "writer": "standby",
    }
    assert (local.memory_budget_mb, local.resident_budget_mb, local.standby_budget_mb) == (
        7168,
        2048,
        4096,
    )
    # The Doorman's routing renders with manifests alone (no vLLM or external routes).
    routing = settings.doorman.routing
    assert routing.routes == []
    (manifest,) = routing.manifests
    assert (manifest.alias, manifest.router_model, manifest.fallback) == (
        "assistant",
        "router",
        "writer",
    )
    assert manifest.intents == {"code": "coder", "writing": "writer"}
    # Every model the alias may reach is one inference-local serves (no route: tier local),
    # and every specialist behind the router is warmed by the router's requests.
    for name in (manifest.router_model, manifest.fallback, *manifest.intents.values()):
        assert models[name].effective_tier != "remote", name
    for name in {manifest.fallback, *manifest.intents.values()}:
        assert manifest.router_model in models[name].co_activation, name


def test_budgets_are_the_meshs_defaults_unless_given() -> None:
    rendered = mesh_config(render("default-values.yaml"))["inference_local"]
    assert not {"memory_budget_mb", "resident_budget_mb", "standby_budget_mb"} & set(rendered)
    # A standby budget of 0 (no standby models) is a budget, not "unset".
    rendered = mesh_config(render_with(_local({"standbyBudgetMb": 0})))["inference_local"]
    assert rendered["standby_budget_mb"] == 0
    assert "resident_budget_mb" not in rendered


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"residentBudgetMb": 6144, "standbyBudgetMb": 3072},
            r"residentBudgetMb \+ standbyBudgetMb \(9216 MiB\) exceed .*\(8Gi\)",
        ),
        (
            {"memoryBudgetMb": 9000, "resources": {"limits": {"memory": "8192Mi"}}},
            r"memoryBudgetMb \(9000 MiB\) exceeds .*\(8192Mi\)",
        ),
    ],
)
def test_budgets_over_the_cpu_pods_memory_limit_fail_the_render(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render_with(_local(values))


@pytest.mark.parametrize(
    "values",
    [
        # Exactly the limit fits.
        {"residentBudgetMb": 6144, "standbyBudgetMb": 2048, "memoryBudgetMb": 8192},
        # One budget alone leaves the other to memory_budget_mb: nothing to add up.
        {"residentBudgetMb": 6144},
        # On a GPU build the budgets count weights in GPU memory, which the limit does not cover.
        {"variant": "cuda", "residentBudgetMb": 65536, "standbyBudgetMb": 16384},
        # A limit in other units is not checked.
        {
            "residentBudgetMb": 6144,
            "standbyBudgetMb": 3072,
            "resources": {"limits": {"memory": "9G"}},
        },
    ],
)
def test_budgets_the_render_cannot_refuse_render(values: Obj) -> None:
    rendered = mesh_config(render_with(_local(values)))["inference_local"]
    assert rendered["resident_budget_mb"] == values["residentBudgetMb"]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [
                {"name": "router", "path": "r.gguf", "tier": "remote"},
                {"name": "coder", "path": "c.gguf", "tier": "standby", "co_activation": ["router"]},
            ],
            r'"coder" co_activation names "router", not a model served here \(served: coder\)',
        ),
        (
            [{"name": "coder", "path": "c.gguf", "tier": "standby", "co_activation": ["nobody"]}],
            r'"coder" co_activation names "nobody"',
        ),
    ],
)
def test_co_activation_of_a_model_not_served_here_fails_the_render(
    models: list[Obj], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render_with(_local({"models": models}))
    # The mesh refuses the same config at start; the chart only says so earlier.
    with pytest.raises(ValueError, match="not a model served here"):
        Settings.model_validate({"inference_local": {"models": models}})


def test_a_manifest_alias_given_twice_fails_the_render() -> None:
    manifest = {"alias": "a", "router_model": "r", "intents": {"x": "s"}, "fallback": "s"}
    values = {**KEYS, "doorman": {"routing": {"manifests": [manifest, manifest]}}}
    with pytest.raises(helm.HelmError, match='alias "a" appears twice'):
        render_with(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"inferenceLocal": {"models": [{"name": "m", "path": "p", "tier": "warm"}]}}, "tier"),
        (
            {"inferenceLocal": {"models": [{"name": "m", "path": "p", "co_activation": "r"}]}},
            "co_activation",
        ),
        ({"inferenceLocal": {"residentBudgetMb": "2Gi"}}, "residentBudgetMb"),
        ({"inferenceLocal": {"memoryBudgetMb": 32}}, "memoryBudgetMb"),
        (
            {"doorman": {"routing": {"manifests": [{"alias": "a", "router_model": "r"}]}}},
            "intents",
        ),
        (
            {
                "doorman": {
                    "routing": {
                        "manifests": [
                            {
                                "alias": "a",
                                "router_model": "r",
                                "intents": {},
                                "fallback": "s",
                            }
                        ]
                    }
                }
            },
            "intents",
        ),
    ],
)
def test_schema_refuses_bad_manifest_values(values: Obj, message: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)


# --- observability and helm test -----------------------------------------------------------


def test_service_monitors_scrape_every_metrics_port() -> None:
    objects = render("gpu-vllm-values.yaml")
    monitors = of_kind(objects, "ServiceMonitor")
    services = of_kind(objects, "Service")
    scraped: set[str] = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]
        for service in services:
            labels = service["metadata"]["labels"]
            if not matches(selector.get("matchLabels", {}), labels):
                continue
            if any(
                labels.get(e["key"]) not in e["values"]
                for e in selector.get("matchExpressions", [])
            ):
                continue
            ports = {p["name"] for p in service["spec"]["ports"]}
            if any(e["port"] in ports for e in monitor["spec"]["endpoints"]):
                scraped.add(labels["app.kubernetes.io/component"])
    assert scraped >= {
        "doorman",
        "inference-local",
        "inference-remote",
        "kv-cache",
        "ledger",
        "gateway",
        "vllm-small",
        "vllm-large",
    }


def test_grafana_dashboard_is_loadable_by_the_sidecar() -> None:
    objects = render("default-values.yaml")
    config_map = named(objects, "ConfigMap", full("dashboard"))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["service-slm.json"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "first token",
        "inter-token",
        "throughput",
        "queue",
        "errors by tier",
        "cache hits",
    ):
        assert topic in titles
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
    # Every mesh metric it charts is one the services register (Counter names gain _total),
    # or one the engine's issue is adding.
    root = Path(__file__).parent.parent
    code = "\n".join(p.read_text() for p in (root / "services").rglob("*.py"))
    charted = {
        metric.removesuffix("_bucket").removesuffix("_total")
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for metric in _metric_names(target["expr"])
        if metric.startswith("slm_")
    }
    missing = {m for m in charted if f'"{m}"' not in code}
    assert missing <= PENDING_METRICS, missing - PENDING_METRICS


def _metric_names(expr: str) -> list[str]:
    return re.findall(r"([a-z_:][a-z0-9_:]*)\{", expr)


def test_helm_test_hook_calls_the_api_through_the_edge() -> None:
    objects = render("default-values.yaml")
    (pod,) = of_kind(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["API"] == f"http://{full('envoy')}:8080"
    script = container["args"][0]
    assert "/v1/models" in script
    assert "/v1/chat/completions" in script
    named(objects, "Service", full("envoy"))
