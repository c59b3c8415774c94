"""The release workflow, checked offline: GitHub's schema, zizmor's audits, and its own scripts."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from test_chart import render

ROOT = Path(__file__).parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
DOCKER = ROOT / "docker"
CHART = ROOT / "charts" / "service-slm"
BIN = Path(sys.executable).parent
# The owner the chart's default image.registry (ghcr.io/<owner>) names.
OWNER = "service-slm"
DIGEST = "sha256:" + "ab" * 32
Obj = dict[str, Any]


def workflow() -> Obj:
    # YAML 1.1 reads the key `on` as true.
    loaded: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return {("on" if key is True else str(key)): value for key, value in loaded.items()}


def step(job: Obj, step_id: str) -> Obj:
    found: list[Obj] = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(found) == 1, step_id
    return found[0]


def named_step(job: Obj, name: str) -> Obj:
    found: list[Obj] = [s for s in job["steps"] if s.get("name") == name]
    assert len(found) == 1, name
    return found[0]


def run_script(script: str, env: dict[str, str], tmp_path: Path) -> tuple[int, dict[str, str]]:
    """Run a step's `run:` as the runner does (bash -e), returning its exit status and outputs."""
    output = tmp_path / "github_output"
    output.write_text("")
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "GITHUB_OUTPUT": str(output), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return result.returncode, outputs


def matrix() -> list[Obj]:
    entries: list[Obj] = workflow()["jobs"]["build"]["strategy"]["matrix"]["include"]
    return entries


def app_version() -> str:
    version: str = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    return version


# --- (a) GitHub's workflow schema, (b) zizmor --------------------------------------------


def test_workflow_validates_against_githubs_schema() -> None:
    # check-jsonschema vendors SchemaStore's github-workflow schema: no download.
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _zizmor(path: Path) -> list[Obj]:
    # The auditor persona runs every audit, pedantic ones included, at every severity and
    # confidence: a release workflow holds the signing identity, so nothing is waved through
    # by default. --no-ignores so that each accepted finding is listed here, with its reason,
    # rather than hidden in the file.
    result = subprocess.run(
        [
            BIN / "zizmor",
            "--offline",
            "--persona",
            "auditor",
            "--no-ignores",
            "--format",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # zizmor exits 0 when clean, 1x when it found something; anything else is a failure to run.
    assert result.returncode == 0 or 10 <= result.returncode <= 14, result.stderr
    findings: list[Obj] = json.loads(result.stdout)
    return findings


def _where(finding: Obj) -> str:
    (primary,) = [
        loc for loc in finding["locations"] if loc["symbolic"]["kind"] == "Primary"
    ] or finding["locations"][:1]
    line: int = primary["concrete"]["location"]["start_point"]["row"] + 1
    return WORKFLOW.read_text().splitlines()[line - 1].strip()


def test_zizmor_finds_nothing_but_the_accepted_index() -> None:
    accepted = {
        # sign's IMAGE_REF indexes the build's outputs by the matrix key, one of a fixed list in
        # this file: "computed", but not outside input.
        ("obfuscation", "IMAGE_REF: ${{ needs.build.outputs[matrix.key] }}"),
    }
    found = {(f["ident"], _where(f).split(" # ")[0]) for f in _zizmor(WORKFLOW)}
    assert found == accepted


@pytest.mark.parametrize(
    ("old", "new", "audit"),
    [
        (
            "actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683",
            "actions/checkout@v4",
            "unpinned-uses",
        ),
        (
            "sigstore/cosign-installer@3454372f43399081ed03b604cb2d021dabca52bb",
            "sigstore/cosign-installer@v3",
            "unpinned-uses",
        ),
        ("persist-credentials: false", "fetch-depth: 1", "artipacked"),
        (
            'cosign sign --yes "$IMAGE_REF"',
            "cosign sign --yes ${{ github.ref_name }}",
            "template-injection",
        ),
        ("permissions: {}", "permissions: write-all", "excessive-permissions"),
    ],
)
def test_zizmor_catches_what_the_workflow_avoids(
    old: str, new: str, audit: str, tmp_path: Path
) -> None:
    """The audit above can fail: each of these mistakes, made in a copy, is reported."""
    text = WORKFLOW.read_text()
    assert old in text
    copy = tmp_path / ".github" / "workflows" / "release.yml"
    copy.parent.mkdir(parents=True)
    copy.write_text(text.replace(old, new, 1))
    assert audit in {f["ident"] for f in _zizmor(copy)}, f"zizmor missed {new!r}"


# --- (c) structure ----------------------------------------------------------------------


def test_runs_on_version_tags_and_by_hand() -> None:
    on = workflow()["on"]
    assert on["push"] == {"tags": ["v*"]}
    assert "workflow_dispatch" in on
    assert "pull_request" not in on  # a fork's code never runs with these permissions


def test_the_matrix_builds_exactly_the_dockerfiles() -> None:
    dockerfiles = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))
    entries = matrix()
    assert sorted(e["dockerfile"] for e in entries) == dockerfiles
    keys = [e["key"] for e in entries]
    assert len(set(keys)) == len(keys)
    jobs = workflow()["jobs"]
    # Each leg publishes its image@digest under its key, and the sign job signs every key.
    assert jobs["build"]["outputs"] == {k: f"${{{{ steps.pushed.outputs.{k} }}}}" for k in keys}
    assert sorted(jobs["sign"]["strategy"]["matrix"]["key"]) == sorted(keys)
    assert jobs["sign"]["needs"] == "build"
    build = step(jobs["build"], "build")
    assert build["with"]["file"] == "docker/${{ matrix.dockerfile }}"
    assert build["with"]["push"] is True


def _named(
    entry: Obj, tmp_path: Path, ref_type: str = "tag", ref_name: str = ""
) -> tuple[int, dict[str, str]]:
    script = step(workflow()["jobs"]["build"], "name")["run"]
    return run_script(
        script,
        {
            "OWNER": "Service-SLM",  # GHCR wants lower case; the owner's name may not be
            "REF_TYPE": ref_type,
            "REF_NAME": ref_name or f"v{app_version()}",
            "REPOSITORY": entry["repository"],
            "SUFFIX": entry["suffix"],
            "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
        },
        tmp_path,
    )


def _chart_images() -> set[str]:
    images: set[str] = set()
    # Every component on (signed-images), and inference-local's CUDA variant (gpu-vllm).
    for name in ("signed-images-values.yaml", "gpu-vllm-values.yaml"):
        for obj in render(name):
            if obj["kind"] != "Deployment":
                continue
            pod = obj["spec"]["template"]["spec"]
            for container in pod.get("initContainers", []) + pod["containers"]:
                if container["image"].startswith(f"ghcr.io/{OWNER}/"):
                    images.add(container["image"])
    return images


def test_images_are_named_as_the_chart_deploys_them(tmp_path: Path) -> None:
    tags = set()
    for entry in matrix():
        status, outputs = _named(entry, tmp_path)
        assert status == 0
        assert outputs["image"] == f"ghcr.io/{OWNER}/{entry['repository']}"
        tags.add(outputs["tag"])
        # The Dockerfile's own build command documents the same name.
        documented = re.findall(
            r"docker build -f docker/\S+ -t (\S+) \.", (DOCKER / entry["dockerfile"]).read_text()
        )
        assert documented == [outputs["tag"]]
    assert tags == _chart_images()


def test_a_tag_other_than_the_charts_app_version_is_refused(tmp_path: Path) -> None:
    status, outputs = _named(matrix()[0], tmp_path, ref_name="v99.0.0")
    assert status != 0
    assert "tag" not in outputs
    # A manual run from a branch builds a version no tag policy admits.
    status, outputs = _named(matrix()[0], tmp_path, ref_type="branch", ref_name="main")
    assert status == 0
    assert outputs["tag"].endswith(f":{app_version()}-sha.0123456789ab")


def test_the_build_records_the_pushed_digest(tmp_path: Path) -> None:
    job = workflow()["jobs"]["build"]
    pushed = step(job, "pushed")
    assert pushed["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"
    assert step(job, "build")["uses"].startswith("docker/build-push-action@")
    image = f"ghcr.io/{OWNER}/doorman"
    env = {"KEY": "doorman", "IMAGE": image, "DIGEST": DIGEST}
    status, outputs = run_script(pushed["run"], env, tmp_path)
    assert status == 0
    assert outputs == {"ref": f"{image}@{DIGEST}", "doorman": f"{image}@{DIGEST}"}
    # No digest, no reference: a failed push never reaches the sign job as a tag.
    status, outputs = run_script(pushed["run"], {**env, "DIGEST": ""}, tmp_path)
    assert status != 0
    assert outputs == {}


def test_the_sbom_is_spdx_json_of_the_pushed_digest() -> None:
    jobs = workflow()["jobs"]
    sbom = named_step(jobs["build"], "SBOM (SPDX JSON)")
    assert sbom["uses"].startswith("anchore/sbom-action@")
    assert sbom["with"]["image"] == "${{ steps.pushed.outputs.ref }}"
    assert sbom["with"]["format"] == "spdx-json"
    path = sbom["with"]["output-file"]
    upload = named_step(jobs["build"], "Keep the SBOM for the sign job")
    assert upload["with"]["path"] == path
    download = named_step(jobs["sign"], "Fetch the SBOM")
    assert download["with"]["name"] == upload["with"]["name"]
    assert jobs["sign"]["env"]["SBOM"] == path


def _cosign_lines(job: Obj) -> list[str]:
    return [
        line.strip()
        for s in job["steps"]
        for line in s.get("run", "").replace("\\\n", " ").splitlines()
        if line.strip().startswith("cosign ")
    ]


def test_every_signed_and_attested_reference_is_the_build_digest() -> None:
    jobs = workflow()["jobs"]
    sign = jobs["sign"]
    assert sign["env"]["IMAGE_REF"] == "${{ needs.build.outputs[matrix.key] }}"
    lines = _cosign_lines(sign)
    assert any(line.startswith("cosign sign ") for line in lines)
    assert any(line.startswith("cosign attest ") for line in lines)
    for line in lines:
        assert re.search(r'"\$IMAGE_REF"( > /dev/null)?$', line), line
    # Nothing else in the workflow runs cosign.
    assert all(not _cosign_lines(job) for name, job in jobs.items() if name != "sign")


def _fake_cosign(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "cosign.log"
    cosign = bin_dir / "cosign"
    cosign.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    cosign.chmod(cosign.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


def test_the_sign_step_signs_only_a_digest(tmp_path: Path) -> None:
    sign = workflow()["jobs"]["sign"]
    bin_dir, log = _fake_cosign(tmp_path)
    path = f"{bin_dir}:{os.environ['PATH']}"
    by_digest = f"ghcr.io/{OWNER}/doorman@{DIGEST}"
    script = named_step(sign, "Sign")["run"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", path)
        status, _ = run_script(script, {"IMAGE_REF": f"ghcr.io/{OWNER}/doorman:0.1.0"}, tmp_path)
        assert status != 0
        assert not log.exists()
        status, _ = run_script(script, {"IMAGE_REF": by_digest}, tmp_path)
        assert status == 0
        attest = named_step(sign, "Attest the SBOM")["run"]
        status, _ = run_script(
            attest, {"IMAGE_REF": by_digest, "SBOM": "sbom-doorman.spdx.json"}, tmp_path
        )
        assert status == 0
    assert log.read_text().splitlines() == [
        f"sign --yes {by_digest}",
        f"attest --yes --type spdxjson --predicate sbom-doorman.spdx.json {by_digest}",
    ]


def test_only_the_signing_job_can_mint_an_oidc_token() -> None:
    loaded = workflow()
    assert loaded["permissions"] == {}
    jobs = loaded["jobs"]
    for name, job in jobs.items():
        signs = any(line.startswith("cosign sign ") for line in _cosign_lines(job))
        assert ("id-token" in job["permissions"]) == signs, name
    assert jobs["build"]["permissions"] == {"contents": "read", "packages": "write"}
    assert jobs["sign"]["permissions"] == {"id-token": "write", "packages": "write"}


def test_third_party_actions_are_pinned_by_commit_with_their_version() -> None:
    uses = re.findall(r"uses: (\S+)(.*)", WORKFLOW.read_text())
    assert uses
    for action, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action), action
        assert re.fullmatch(r" # v\d+\.\d+\.\d+", comment), f"{action}{comment}"
