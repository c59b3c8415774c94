"""`slm up` restarts a child that crashes, and the mesh answers again."""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings

pytestmark = pytest.mark.e2e


def child_pids(config_path: Path, service: str) -> list[int]:
    """PIDs of `slm --config PATH serve SERVICE` processes, read from /proc."""
    wanted = ["--config", str(config_path), "serve", service]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if any(argv[i : i + len(wanted)] == wanted for i in range(len(argv))):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def own_mesh(model_path: Path, tmp_path: Path) -> Iterator[Mesh]:
    mesh = Mesh(mesh_settings(tmp_path), tmp_path / "slm.toml", tmp_path / "mesh.log")
    mesh.start()
    yield mesh
    assert mesh.stop() == 0, mesh.log_tail()


def test_crashed_child_is_restarted(own_mesh: Mesh) -> None:
    """A child that dies of a segfault (as a native library's crash would) leaves its Python
    stack in the log and is restarted."""
    [doorman] = child_pids(own_mesh.config_path, "doorman")
    os.kill(doorman, signal.SIGSEGV)
    # The client retries on 503 while the supervisor brings the Doorman back. Closed at the
    # end: a socket left to the garbage collector fails the run with a ResourceWarning.
    with own_mesh.openai_client(max_retries=10) as client:
        reply = client.completions.create(model=DEFAULT_MODEL, prompt="Hello", max_tokens=2)
    assert reply.choices[0].text is not None
    [restarted] = child_pids(own_mesh.config_path, "doorman")
    assert restarted != doorman
    log = own_mesh.log_path.read_text(errors="replace")
    assert "Fatal Python error: Segmentation fault" in log
    assert '"code": -11' in log
    assert "child exited; restarting" in log


def test_children_die_with_a_killed_supervisor(model_path: Path, tmp_path: Path) -> None:
    mesh = Mesh(mesh_settings(tmp_path), tmp_path / "slm.toml", tmp_path / "mesh.log")
    mesh.start()
    assert mesh.process is not None
    services = ("ledger", "inference-local", "doorman", "gateway")
    children = [pid for s in services for pid in child_pids(mesh.config_path, s)]
    assert len(children) == len(services)
    # Watch each child through a pidfd: it becomes readable when the process exits.
    watches = {pid: os.pidfd_open(pid) for pid in children}
    mesh.process.kill()  # SIGKILL: the supervisor cannot stop anything itself
    try:
        for pid, fd in watches.items():
            readable, _, _ = select.select([fd], [], [], 60)
            assert readable, f"child {pid} outlived its supervisor"
    finally:
        for fd in watches.values():
            os.close(fd)
        mesh.stop()
    assert child_pids(mesh.config_path, "doorman") == []


def stat_field(pid: int, field: int) -> int:
    """Field `field` (numbered from 1, as proc(5) does) of /proc/<pid>/stat, counted after its
    "(comm)", which may hold spaces."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[field - 3])


def niceness(pid: int) -> int:
    return stat_field(pid, 19)


def session(pid: int) -> int:
    return stat_field(pid, 6)


def test_inference_local_yields_the_cpu_to_the_latency_bound_processes(mesh: Mesh) -> None:
    """`slm up` starts inference-local at its configured niceness (19 by default), the others at
    the supervisor's own: a refusal or a relayed token does not wait behind llama.cpp. Where the
    kernel groups each session for scheduling (autogroup), a niceness weighs only against its
    own group's threads: the children stay in the supervisor's session, so that it weighs
    against the rest of the mesh."""
    assert mesh.process is not None
    own = niceness(mesh.process.pid)
    [inference] = child_pids(mesh.config_path, "inference-local")
    [doorman] = child_pids(mesh.config_path, "doorman")
    assert mesh.settings.inference_local.nice == 19
    assert niceness(inference) == 19
    assert niceness(doorman) == own
    assert session(inference) == session(doorman) == session(mesh.process.pid)
    if Path("/proc/self/autogroup").exists():
        # Empty where the process is scheduled by its cgroup rather than an autogroup (autogroup
        # off, or a container's cgroup): then all three read empty, which is the same group.
        group = autogroup(mesh.process.pid)
        assert autogroup(inference) == group
        assert autogroup(doorman) == group


def autogroup(pid: int) -> str:
    """The scheduling autogroup a process is in ("/autogroup-N"), or "" where it is in none."""
    text = Path(f"/proc/{pid}/autogroup").read_text().split()
    return text[0] if text else ""


def ignores(pid: int, signum: int) -> bool:
    """Whether the process ignores a signal (SigIgn of /proc/<pid>/status, a hex bit mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def test_children_log_to_a_terminal_without_being_stopped(mesh: Mesh) -> None:
    """Each child is a background process group of the supervisor's session: it ignores
    SIGTTOU, so that a terminal set to `stty tostop` lets its logs through instead of stopping
    it."""
    for name in ("inference-local", "doorman", "gateway"):
        [pid] = child_pids(mesh.config_path, name)
        assert ignores(pid, signal.SIGTTOU), name


def environment(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def test_inference_local_gets_huge_pages_for_its_buffers(mesh: Mesh) -> None:
    """glibc's malloc asks for transparent huge pages in inference-local only (its KV cache);
    a caller's own GLIBC_TUNABLES would win."""
    assert "GLIBC_TUNABLES" not in os.environ
    [inference] = child_pids(mesh.config_path, "inference-local")
    [doorman] = child_pids(mesh.config_path, "doorman")
    assert environment(inference)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in environment(doorman)
