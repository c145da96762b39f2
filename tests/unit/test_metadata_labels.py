"""Process labels end to end: a fake /proc with recorded cgroup files -> symbolize -> pprof labels -> OTLP resource.

The symbolizer's process registry reads the labels (`agent.metadata.process.ProcessMetadata`) when it
captures a live process; the pprof builder turns them into string labels and the OTLP encoder into
resource attributes, next to the host's `k8s.node.name`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent._proto import profile_pb2
from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.export.otlp import resource as resource_module
from agent.export.otlp.encode import encode_request
from agent.export.otlp.resource import ResourceOptions, process_resource
from agent.metadata.host import HostAttributes
from agent.metadata.process import ProcessLabels, ProcessMetadata
from agent.pprof.builder import build_pprof
from agent.process.registry import ProcessRegistry
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import ProcessInfo, Profile
from agent.types import ProfileSpec, Stack, StackStatus, ValueType

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
DOCKER_ID = "62c0387159d0bf7a69edf5d270c68e53693b0c55f17871f74b015dbf7f4ccbaf"
K8S_CONTAINER_ID = "910896c677d06462defef60b3cdd5a8db571a0bf52148cd92871bea57a52d70f"
POD_UID = "37af5137-8237-4250-b3fe-f29e6704619e"
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
RESOURCE = ResourceOptions(host_name="host-1", host_arch="amd64", node_name="node-7")
TEXT_BASE = 0x5555_5555_4000
DOCKER_PID, POD_PID, SERVICE_PID, HOST_PID = 101, 202, 303, 404


def make_process(proc: Path, pid: int, comm: str, exe: str, cgroup: str, start_time: int = 4242) -> None:
    """A live process as both the symbolizer (maps, comm, exe) and the metadata reader (stat, cgroup) see it."""
    pid_dir = proc / str(pid)
    pid_dir.mkdir()
    # The file does not exist on this host: frames stay unnamed but keep their mapping, which is enough.
    (pid_dir / "maps").write_text(f"{TEXT_BASE:x}-{TEXT_BASE + 0x4000:x} r-xp 00001000 fd:01 4711 {exe}\n")
    (pid_dir / "comm").write_text(comm + "\n")
    (pid_dir / "exe").symlink_to(exe)
    (pid_dir / "cmdline").write_bytes(exe.encode() + b"\0")
    stat = f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 1 1 0 0 20 0 1 0 {start_time} 2194 11 0"
    (pid_dir / "stat").write_text(stat + "\n")
    (pid_dir / "cgroup").write_text(cgroup)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture
def labelled_proc(fake_proc: Path) -> Path:
    make_process(fake_proc, DOCKER_PID, "redis-server", "/usr/local/bin/redis-server", fixture("docker-v2-systemd.txt"))
    make_process(fake_proc, POD_PID, "app", "/app/server", fixture("k8s-containerd-v2-systemd.txt"))
    make_process(fake_proc, SERVICE_PID, "nginx", "/usr/sbin/nginx", fixture("systemd-service-v2.txt"))
    make_process(fake_proc, HOST_PID, "bash", "/usr/bin/bash", fixture("user-session-v2.txt"))
    return fake_proc


def interval(*pids: int) -> IntervalProfile:
    samples = tuple(
        AggregatedSample(
            SampleKey(pid, pid, 0, Stack(StackStatus.NOT_COLLECTED, ()), Stack(StackStatus.OK, (TEXT_BASE + 0x10,))),
            "main",
            (1,),
            (1_500,),
        )
        for pid in pids
    )
    return IntervalProfile(SPEC, 1_000, 2_000, 1_700_000_000_000_000_000, samples)


def symbolize(proc: Path, *pids: int, metadata: ProcessMetadata | None = None) -> Profile:
    symbolizer = Symbolizer(ProcessRegistry(proc, metadata=metadata))
    for pid in pids:
        symbolizer.processes.observe_process(pid)
    return symbolizer.symbolize(interval(*pids))


def pprof_labels(data: bytes) -> dict[int, dict[str, str]]:
    """{pid: {string label key: value}} of a serialized pprof profile."""
    message = profile_pb2.Profile()
    message.ParseFromString(data)
    strings = list(message.string_table)
    by_pid: dict[int, dict[str, str]] = {}
    for sample in message.sample:
        pid = next(label.num for label in sample.label if strings[label.key] == "pid")
        by_pid[pid] = {strings[label.key]: strings[label.str] for label in sample.label if label.str}
    return by_pid


def resource_attributes(profile: Profile, options: ResourceOptions = RESOURCE) -> dict[int, dict[str, object]]:
    """{pid: {resource attribute: value}} of the OTLP request the profile encodes to."""
    (request,) = encode_request([(profile, b"")], options, include_pprof=False)
    by_pid: dict[int, dict[str, object]] = {}
    for resource_profiles in request.resource_profiles:
        attrs: dict[str, object] = {}
        for kv in resource_profiles.resource.attributes:
            kind = kv.value.WhichOneof("value")
            attrs[kv.key] = getattr(kv.value, kind) if kind else None
        by_pid[int(str(attrs["process.pid"]))] = attrs
    return by_pid


def test_symbolizer_captures_the_labels_of_live_processes(labelled_proc: Path) -> None:
    profile = symbolize(labelled_proc, DOCKER_PID, POD_PID, SERVICE_PID, HOST_PID)
    assert profile.processes[DOCKER_PID] == ProcessInfo(
        DOCKER_PID, "redis-server", "/usr/local/bin/redis-server", container_id=DOCKER_ID
    )
    assert profile.processes[POD_PID] == ProcessInfo(
        POD_PID, "app", "/app/server", container_id=K8S_CONTAINER_ID, pod_uid=POD_UID
    )
    assert profile.processes[SERVICE_PID] == ProcessInfo(
        SERVICE_PID, "nginx", "/usr/sbin/nginx", systemd_unit="nginx.service"
    )
    assert profile.processes[HOST_PID].systemd_unit == "session-3.scope"
    assert profile.processes[HOST_PID].container_id == ""


def test_default_metadata_reads_from_the_symbolizers_proc_root(labelled_proc: Path) -> None:
    # No `metadata` argument: the symbolizer makes its own reader on the same proc root.
    symbolizer = Symbolizer(ProcessRegistry(labelled_proc, ttl_intervals=2), elf_cache_size=4)
    symbolizer.processes.observe_process(DOCKER_PID)
    assert symbolizer.symbolize(interval(DOCKER_PID)).processes[DOCKER_PID].container_id == DOCKER_ID


def test_a_shared_metadata_reader_is_used_and_caches(labelled_proc: Path) -> None:
    metadata = ProcessMetadata(labelled_proc)
    symbolize(labelled_proc, SERVICE_PID, metadata=metadata)
    assert metadata.stats.cache_misses == 1
    assert metadata.read(SERVICE_PID).systemd_unit == "nginx.service"
    assert metadata.stats.cache_hits == 1


def test_labels_are_read_outside_the_registry_lock(labelled_proc: Path) -> None:
    lock_held: list[bool] = []

    class WatchingMetadata(ProcessMetadata):
        registry_lock: threading.Lock | None = None

        def read(self, pid: int) -> ProcessLabels:
            assert self.registry_lock is not None
            lock_held.append(self.registry_lock.locked())
            return super().read(pid)

    metadata = WatchingMetadata(labelled_proc)
    symbolizer = Symbolizer(ProcessRegistry(labelled_proc, metadata=metadata))
    metadata.registry_lock = symbolizer.processes._lock  # the lock that guards the snapshots
    symbolizer.processes.observe_process(DOCKER_PID)
    assert lock_held == [False]


def test_a_process_gone_before_its_labels_are_read_keeps_its_snapshot_without_labels(labelled_proc: Path) -> None:
    (labelled_proc / str(DOCKER_PID) / "stat").unlink()  # what a vanished process looks like to the reader
    profile = symbolize(labelled_proc, DOCKER_PID)
    assert profile.processes[DOCKER_PID] == ProcessInfo(DOCKER_PID, "redis-server", "/usr/local/bin/redis-server")


def test_pprof_samples_carry_the_metadata_labels(labelled_proc: Path) -> None:
    labels = pprof_labels(build_pprof(symbolize(labelled_proc, DOCKER_PID, POD_PID, SERVICE_PID)))
    assert labels[DOCKER_PID] == {"comm": "redis-server", "thread_name": "main", "container_id": DOCKER_ID}
    assert labels[POD_PID] == {
        "comm": "app",
        "thread_name": "main",
        "container_id": K8S_CONTAINER_ID,
        "pod_uid": POD_UID,
    }
    assert labels[SERVICE_PID] == {"comm": "nginx", "thread_name": "main", "systemd_unit": "nginx.service"}


def test_otlp_resources_carry_the_metadata_and_the_node_name(labelled_proc: Path) -> None:
    attrs = resource_attributes(symbolize(labelled_proc, DOCKER_PID, POD_PID, SERVICE_PID))
    assert attrs[DOCKER_PID]["container.id"] == DOCKER_ID
    assert "k8s.pod.uid" not in attrs[DOCKER_PID] and "systemd.unit" not in attrs[DOCKER_PID]
    assert attrs[POD_PID]["container.id"] == K8S_CONTAINER_ID
    assert attrs[POD_PID]["k8s.pod.uid"] == POD_UID
    assert attrs[SERVICE_PID]["systemd.unit"] == "nginx.service"
    assert "container.id" not in attrs[SERVICE_PID]
    for pid in (DOCKER_PID, POD_PID, SERVICE_PID):
        assert attrs[pid]["k8s.node.name"] == "node-7"
        assert attrs[pid]["host.name"] == "host-1"
        assert attrs[pid]["host.arch"] == "amd64"


def test_no_node_name_outside_kubernetes(labelled_proc: Path) -> None:
    options = ResourceOptions(host_name="host-1", host_arch="amd64")
    attrs = resource_attributes(symbolize(labelled_proc, DOCKER_PID), options)
    assert "k8s.node.name" not in attrs[DOCKER_PID]


def test_resource_hook_fills_gaps_but_overrides_no_metadata() -> None:
    process = ProcessInfo(7, "app", "/bin/app", container_id="c" * 64)
    extra = {"container.id": "from-hook", "k8s.pod.uid": "pod-from-hook", "deployment.environment": "prod"}
    attrs = {kv.key: kv.value.string_value for kv in process_resource(RESOURCE, process, extra).attributes}
    assert attrs["container.id"] == "c" * 64
    assert attrs["k8s.pod.uid"] == "pod-from-hook"
    assert attrs["deployment.environment"] == "prod"


def test_resource_options_detect_uses_the_host_attributes() -> None:
    options = ResourceOptions.detect("checkout", node_name=" node-3 ")
    host = HostAttributes.detect("node-3")
    assert (options.host_name, options.host_arch, options.os_type) == (host.host_name, host.host_arch, host.os_type)
    assert options.service_name == "checkout"
    assert options.node_name == "node-3"
    assert options.host == host
    assert not hasattr(resource_module, "_ARCH")  # one arch table: agent.metadata.host's
