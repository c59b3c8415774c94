"""The chart's imagePolicy: policy-controller ClusterImagePolicies over every image it runs."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml  # type: ignore[import-untyped]
from test_chart import CHART, NAMESPACE, RELEASE, VALUE_FILES, of_kind, values_of

WORKFLOW = Path(__file__).parent.parent / ".github" / "workflows" / "release.yml"
DIGEST = "sha256:" + "0" * 64
INCLUDE_LABEL = "policy.sigstore.dev/include"
Obj = dict[str, Any]


# --- the policy-controller's image matching (pkg/apis/glob/glob.go), in Python ----------------

_VALID_GLOB = re.compile(r"[a-zA-Z0-9\-_:/*.]+")


def _glob_regexp(glob: str) -> re.Pattern[str]:
    if glob == "*/*":
        glob = "index.docker.io/*/*"
    if glob == "*":
        glob = "index.docker.io/library/*"
    if not _VALID_GLOB.fullmatch(glob):
        raise ValueError(f"invalid glob {glob!r}")
    pattern = glob.replace(".", r"\.").replace("**", "#").replace("*", "[^/]*").replace("#", ".*")
    return re.compile(pattern)


def _qualified(repository: str) -> str:
    """go-containerregistry's Repository.Name(): registry always, Docker Hub's library/ too."""
    host, _, path = repository.partition("/")
    if path and host in ("docker.io", "index.docker.io"):
        repository = path
    elif path and ("." in host or ":" in host or host == "localhost"):
        return repository
    return f"index.docker.io/{repository if '/' in repository else 'library/' + repository}"


def _split(image: str) -> tuple[str, str]:
    """An image reference as (repository, ':tag' or '@digest'); no tag means :latest."""
    if "@" in image:
        repository, digest = image.split("@", 1)
        return repository, "@" + digest
    head, _, last = image.rpartition("/")
    name, _, tag = last.partition(":")
    return f"{head}/{name}" if head else name, ":" + (tag or "latest")


def reference_name(image: str) -> str:
    repository, version = _split(image)
    return _qualified(repository) + version


def resolved(image: str) -> str:
    """What the policy-controller matches: its mutating webhook swaps the tag for the digest."""
    return _qualified(_split(image)[0]) + "@" + DIGEST


def glob_matches(glob: str, image: str) -> bool:
    regexp = _glob_regexp(glob)
    name = reference_name(image)
    # The policy-controller's deprecated fallback: the reference as written.
    return bool(regexp.fullmatch(name) or (name != image and regexp.fullmatch(image)))


@pytest.mark.parametrize(
    ("image", "glob", "expected"),
    [
        # Cases of the policy-controller's own glob_test.go.
        ("foo", "index.docker.io/library/foo:*", True),
        ("foo", "index.docker.io/*/*", True),
        ("foo", "*", True),
        ("myuser/myapp", "index.docker.io/myuser/*", True),
        ("myuser/myapp", "*/*", True),
        ("ghcr.io/foo/bar", "ghcr.io/*/*", True),
        ("ghcr.io/foo", "ghcr.io/*/*", False),
        ("ghcr.io/foo", "ghcr.io/foo*", True),
        ("prefix-ghcr.io/foo", "ghcr.io/foo", False),
        ("ghcr.io/foo-suffix", "ghcr.io/foo", False),
        ("ghcrxio/foo", "ghcr.io/**", False),
    ],
)
def test_the_glob_port_agrees_with_the_policy_controller(
    image: str, glob: str, expected: bool
) -> None:
    assert glob_matches(glob, image) is expected


# --- rendering --------------------------------------------------------------------------------


def _merge(base: Obj, extra: Obj) -> Obj:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render_values(values: Obj) -> tuple[list[Obj], str]:
    """Objects and NOTES.txt of an install with these values."""
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Obj] = []
    notes = ""
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects, notes


def with_policy(name: str, extra: Obj | None = None) -> list[Obj]:
    values = _merge(values_of(name), {"imagePolicy": {"enabled": True}})
    return render_values(_merge(values, extra or {}))[0]


def workload_images(objects: list[Obj]) -> set[str]:
    """Every image a pod of the release runs: Deployments' containers and init containers, and
    the helm test pod."""
    images: set[str] = set()
    for obj in objects:
        if obj["kind"] == "Pod":
            pod = obj["spec"]
        elif "template" in obj.get("spec", {}):
            pod = obj["spec"]["template"]["spec"]
        else:
            continue
        for container in pod.get("initContainers", []) + pod["containers"]:
            images.add(container["image"])
    return images


def policies(objects: list[Obj]) -> dict[str, Obj]:
    found = {
        p["metadata"]["name"].removeprefix(f"{NAMESPACE}-{RELEASE}-service-slm-"): p
        for p in of_kind(objects, "ClusterImagePolicy")
    }
    for policy in found.values():
        assert policy["apiVersion"] == "policy.sigstore.dev/v1beta1"
        assert policy["spec"]["mode"] == "enforce"
    return found


def admitted_by(policy: Obj, image: str) -> bool:
    return any(glob_matches(i["glob"], resolved(image)) for i in policy["spec"]["images"])


# --- coverage -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_FILES)
def test_every_image_the_chart_runs_is_under_a_policy(name: str) -> None:
    objects = with_policy(name)
    found = policies(objects)
    assert set(found) == {"signed-images", "third-party-images"}
    registry = _merge(yaml.safe_load((CHART / "values.yaml").read_text()), values_of(name))[
        "image"
    ]["registry"]
    images = workload_images(objects)
    assert any(i.startswith(f"{registry}/") for i in images)
    for image in images:
        ours = image.startswith(f"{registry}/")
        # The chart's own images need the release signature and can never take the third-party
        # authorities (a policy-controller admits an image only if every matching policy does).
        assert admitted_by(found["signed-images"], image) is ours, image
        assert admitted_by(found["third-party-images"], image) is not ours, image


@pytest.mark.parametrize(
    "extra",
    [
        {"image": {"registry": "registry.example.com:5000/mesh", "tag": "1.2.3"}},
        {"image": {"registry": "myorg"}},  # Docker Hub: the policy-controller sees index.docker.io
        {"vllm": {"image": {"repository": "nvcr.io/nim/vllm-openai"}}},
        {"tests": {"image": {"repository": "busybox", "tag": "1.37.0"}}},
        {"doorman": {"image": {"repository": "slm-doorman"}}},
    ],
)
def test_the_globs_follow_the_image_values(extra: Obj) -> None:
    objects = with_policy("signed-images-values.yaml", extra)
    found = policies(objects)
    for image in workload_images(objects):
        assert any(admitted_by(p, image) for p in found.values()), image


def test_images_outside_the_release_match_no_glob() -> None:
    found = policies(with_policy("signed-images-values.yaml"))
    for image in (
        "ghcr.io/someone-else/doorman:0.1.0",
        "ghcr.io/service-slm/doorman/inner:0.1.0",
        "docker.io/library/doorman:0.1.0",
        "curlimages/curl-evil/x:1",
        "vllm/other:v0.11.0",
    ):
        assert not any(admitted_by(p, image) for p in found.values()), image


# --- what the signed-images policy requires -----------------------------------------------------


def _authority(objects: list[Obj]) -> Obj:
    (authority,) = policies(objects)["signed-images"]["spec"]["authorities"]
    assert isinstance(authority, dict)
    return authority


def test_the_identity_is_the_release_workflow_on_a_version_tag() -> None:
    (identity,) = _authority(with_policy("signed-images-values.yaml"))["keyless"]["identities"]
    assert identity["issuer"] == "https://token.actions.githubusercontent.com"
    subject = re.compile(identity["subjectRegExp"])
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    repository = chart["home"].removeprefix("https://github.com/")
    workflow_path = WORKFLOW.relative_to(WORKFLOW.parents[2]).as_posix()
    assert workflow_path == ".github/workflows/release.yml"
    assert WORKFLOW.is_file()
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True]["push"]["tags"] == ["v*"]

    # Fulcio's SAN for GitHub Actions: https://github.com/ + the job's workflow ref.
    def signed_by(repo: str, path: str, ref: str) -> bool:
        return subject.search(f"https://github.com/{repo}/{path}@{ref}") is not None

    assert signed_by(repository, workflow_path, f"refs/tags/v{chart['appVersion']}")
    assert not signed_by(repository, workflow_path, "refs/heads/main")
    assert not signed_by(repository, workflow_path, "refs/pull/1/merge")
    assert not signed_by(repository, ".github/workflows/ci.yml", "refs/tags/v0.1.0")
    assert not signed_by("someone/service-slm", workflow_path, "refs/tags/v0.1.0")
    assert not signed_by(repository + "-fork", workflow_path, "refs/tags/v0.1.0")


def test_the_sbom_attestation_the_workflow_makes_is_required() -> None:
    authority = _authority(with_policy("signed-images-values.yaml"))
    assert authority["attestations"] == [{"name": "sbom", "predicateType": "spdxjson"}]
    assert "cosign attest --yes --type spdxjson" in WORKFLOW.read_text()
    without = _authority(
        with_policy("signed-images-values.yaml", {"imagePolicy": {"requireSBOM": False}})
    )
    assert "attestations" not in without


def test_third_party_authorities_come_from_the_values() -> None:
    keyless = {
        "name": "vllm-release",
        "keyless": {
            "url": "https://fulcio.sigstore.dev",
            "identities": [
                {"issuer": "https://token.actions.githubusercontent.com", "subject": "x"}
            ],
        },
    }
    objects = with_policy(
        "signed-images-values.yaml", {"imagePolicy": {"thirdPartyAuthorities": [keyless]}}
    )
    assert policies(objects)["third-party-images"]["spec"]["authorities"] == [keyless]


# --- on, off, and the namespace opt-in -----------------------------------------------------


@pytest.mark.parametrize("name", [n for n in VALUE_FILES if n != "signed-images-values.yaml"])
def test_off_by_default_no_policy_is_rendered(name: str) -> None:
    objects, notes = render_values(values_of(name))
    assert not of_kind(objects, "ClusterImagePolicy")
    assert not of_kind(objects, "Namespace")
    assert INCLUDE_LABEL not in notes


def test_the_namespace_opts_in_when_the_chart_owns_it() -> None:
    objects, notes = render_values(values_of("signed-images-values.yaml"))
    (namespace,) = of_kind(objects, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"][INCLUDE_LABEL] == "true"
    assert INCLUDE_LABEL not in notes


def test_otherwise_the_notes_say_how_to_opt_in() -> None:
    values = _merge(
        values_of("signed-images-values.yaml"), {"imagePolicy": {"createNamespace": False}}
    )
    objects, notes = render_values(values)
    assert not of_kind(objects, "Namespace")
    assert len(of_kind(objects, "ClusterImagePolicy")) == 2
    assert f"kubectl label namespace {NAMESPACE} {INCLUDE_LABEL}=true" in notes


def test_the_schema_refuses_unknown_policy_keys() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match="enable"):
        chart.validate_schema({"imagePolicy": {"enable": True}})
