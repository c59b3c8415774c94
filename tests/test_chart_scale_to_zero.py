"""The chart's GPU burst pools that scale to zero: KEDA on the Doorman's demand, and the Doorman's
route waiting for a cold pool. Rendered with Helm's engine like the rest of the chart."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
from prometheus_client import CollectorRegistry
from test_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    full,
    mesh_config,
    named,
    of_kind,
    render,
    values_of,
)

from doorman.core import DoormanMetrics
from doorman.routing import TIERS

EXAMPLE = "gpu-vllm-values.yaml"


def pools() -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in values_of(EXAMPLE)["vllm"]["pools"]}


def test_a_scale_to_zero_pool_is_scaled_by_keda_on_the_doormans_demand() -> None:
    objects = render(EXAMPLE)
    configured = pools()
    scaled = {o["metadata"]["name"]: o for o in of_kind(objects, "ScaledObject")}
    expected = {full(f"vllm-{n}") for n, p in configured.items() if p.get("scaleToZero")}
    assert set(scaled) == expected
    assert expected
    for name, pool in configured.items():
        deployment = named(objects, "Deployment", full(f"vllm-{name}"))
        if full(f"vllm-{name}") not in scaled:
            assert deployment["spec"]["replicas"] == pool.get("replicas", 1)
            continue
        # KEDA owns the replica count; the Deployment must not fight it.
        assert "replicas" not in deployment["spec"]
        spec = scaled[full(f"vllm-{name}")]["spec"]
        assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert spec["minReplicaCount"] == 0
        assert spec["maxReplicaCount"] == pool["scaleToZero"]["maxReplicas"]
        assert spec["cooldownPeriod"] == pool["scaleToZero"]["idleSeconds"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["activationThreshold"] == "0"
        query = trigger["metadata"]["query"]
        # The query reads the gauge the Doorman exports, with the labels it sets, for the
        # pool's served model in this release's namespace.
        metric, labels = re.fullmatch(r"sum\((\w+)\{(.*)\}\) or vector\(0\)", query).groups()  # type: ignore[union-attr]
        selector = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert selector == {
            "namespace": NAMESPACE,
            "tier": _tier_label("gpu"),
            "model": pool.get("servedModelName", pool["model"]),
        }
        gauge = DoormanMetrics(CollectorRegistry()).tier_demand
        assert gauge._name == metric
        assert set(gauge._labelnames) == {"tier", "model"}


def _tier_label(tier: str) -> str:
    from slm.v1 import types_pb2

    return types_pb2.Tier.Name(TIERS[tier])


def test_the_doorman_waits_for_a_cold_pool_before_it_falls_back() -> None:
    objects = render(EXAMPLE)
    routes = {r["model"]: r["chain"] for r in mesh_config(objects)["doorman"]["routing"]["routes"]}
    for pool in pools().values():
        (step,) = routes[pool.get("servedModelName", pool["model"])]
        scale = pool.get("scaleToZero")
        if scale:
            assert step["cold_start_wait_s"] == scale["coldStartWaitSeconds"]
        else:
            assert "cold_start_wait_s" not in step


def test_scale_to_zero_needs_the_prometheus_keda_reads() -> None:
    values = values_of(EXAMPLE)
    values["vllm"]["keda"]["prometheusUrl"] = ""
    chart = helm.Chart.load(CHART)
    with pytest.raises(Exception, match=r"vllm\.keda\.prometheusUrl is required"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
