"""Tests for the metadata stage's /proc/PID/cgroup parser (`agent.metadata.cgroup`).

Each fixture under `fixtures/cgroup/` reproduces the /proc/PID/cgroup a container runtime or systemd
leaves on a real host, as read from the host's cgroup namespace; the case ids name the runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.metadata.cgroup import CgroupInfo, parse_cgroup

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"

DOCKER_V1 = "ab8ee1f9b24be1810e6b874217173d150777ce76dac1753e1fcefe5da951076b"
DOCKER_HYBRID = "2f6792706a568c23eef600f1c10605804d335b3df2aa43a71a5f7ea89c66e777"
DOCKER_V2_CGROUPFS = "bef196201988caf48a788cf1ea757bf3642164bb9923c1dc4cd9bd062b8ad9b8"
DOCKER_V2_SYSTEMD = "62c0387159d0bf7a69edf5d270c68e53693b0c55f17871f74b015dbf7f4ccbaf"
CONTAINERD = "910896c677d06462defef60b3cdd5a8db571a0bf52148cd92871bea57a52d70f"
CONTAINERD_GUARANTEED = "b9ff84a6ce4e63735d5ae50c09ac24eb0def5308d9095ef46b45825f16c5bba2"
K8S_V1 = "90ae0e2d93220e2c3045b1107a9296ed9d0aecf537bc6a8583e6f6628ff7f77b"
CRIO = "067a02365d52f5bb47419229854fd94378d534789a330c565b57a6bc7be5e555"
PODMAN_ROOTFUL = "4d53af9530f604cc347b71256a261fd47ca12b8d56d6f04ac58564a800bf6fc5"
PODMAN_ROOTLESS = "687e9f9c9fcf71f6335afac99dc9016e3eac610b48bb048d8c4f8e1281ed84d4"
CRIO_POD = "c8ad063f-e367-44b0-9c1d-ba86cc50288b"

CASES = [
    pytest.param(
        "docker-v1-cgroupfs.txt",
        CgroupInfo(f"/docker/{DOCKER_V1}", DOCKER_V1, "docker"),
        id="docker cgroup v1 (RHEL 7), cgroupfs driver",
    ),
    pytest.param(
        "docker-hybrid-cgroupfs.txt",
        CgroupInfo(f"/docker/{DOCKER_HYBRID}", DOCKER_HYBRID, "docker"),
        id="docker hybrid v1+v2 (Ubuntu 20.04): unified line left at containerd.service is not the unit",
    ),
    pytest.param(
        "docker-v2-cgroupfs.txt",
        CgroupInfo(f"/docker/{DOCKER_V2_CGROUPFS}", DOCKER_V2_CGROUPFS, "docker"),
        id="docker cgroup v2, cgroupfs driver",
    ),
    pytest.param(
        "docker-v2-systemd.txt",
        CgroupInfo(f"/system.slice/docker-{DOCKER_V2_SYSTEMD}.scope", DOCKER_V2_SYSTEMD, "docker"),
        id="docker cgroup v2, systemd driver: the container scope is not a unit",
    ),
    pytest.param(
        "k8s-containerd-v2-systemd.txt",
        CgroupInfo(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod37af5137_8237_4250_b3fe_f29e6704619e"
            f".slice/cri-containerd-{CONTAINERD}.scope",
            CONTAINERD,
            "containerd",
            "37af5137-8237-4250-b3fe-f29e6704619e",
            "burstable",
        ),
        id="kubernetes containerd cgroup v2, systemd driver, burstable pod",
    ),
    pytest.param(
        "k8s-containerd-v2-systemd-guaranteed.txt",
        CgroupInfo(
            f"/kubepods.slice/kubepods-pod80f999fe_3916_4e61_bae4_955559c6832e.slice/cri-containerd-{CONTAINERD_GUARANTEED}"
            ".scope",
            CONTAINERD_GUARANTEED,
            "containerd",
            "80f999fe-3916-4e61-bae4-955559c6832e",
            "guaranteed",
        ),
        id="kubernetes containerd cgroup v2, systemd driver, guaranteed pod (no QoS slice)",
    ),
    pytest.param(
        "k8s-containerd-v1-cgroupfs.txt",
        CgroupInfo(
            f"/kubepods/besteffort/pod6a24f208-353e-4f80-ab97-333763c15a81/{K8S_V1}",
            K8S_V1,
            "",
            "6a24f208-353e-4f80-ab97-333763c15a81",
            "besteffort",
        ),
        id="kubernetes cgroup v1, cgroupfs driver, besteffort pod",
    ),
    pytest.param(
        "crio-v2-systemd.txt",
        CgroupInfo(
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{CRIO_POD.replace('-', '_')}.slice"
            f"/crio-{CRIO}.scope",
            CRIO,
            "cri-o",
            CRIO_POD,
            "besteffort",
        ),
        id="cri-o cgroup v2, systemd driver",
    ),
    pytest.param(
        "crio-conmon-v2-systemd.txt",
        CgroupInfo(
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{CRIO_POD.replace('-', '_')}.slice"
            f"/crio-conmon-{CRIO}.scope",
            "",
            "",
            CRIO_POD,
            "besteffort",
        ),
        id="cri-o conmon: in the pod, not in the container",
    ),
    pytest.param(
        "podman-rootful-v2.txt",
        CgroupInfo(f"/machine.slice/libpod-{PODMAN_ROOTFUL}.scope/container", PODMAN_ROOTFUL, "podman"),
        id="podman rootful cgroup v2 (crun's container sub-cgroup)",
    ),
    pytest.param(
        "podman-conmon-rootful-v2.txt",
        CgroupInfo(f"/machine.slice/libpod-conmon-{PODMAN_ROOTFUL}.scope"),
        id="podman conmon: not a container",
    ),
    pytest.param(
        "podman-rootless-v2.txt",
        CgroupInfo(
            f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{PODMAN_ROOTLESS}.scope/container",
            PODMAN_ROOTLESS,
            "podman",
            systemd_unit="user@1000.service",
        ),
        id="podman rootless cgroup v2: container under the user's manager",
    ),
    pytest.param(
        "systemd-service-v2.txt",
        CgroupInfo("/system.slice/nginx.service", systemd_unit="nginx.service"),
        id="systemd service cgroup v2",
    ),
    pytest.param(
        "systemd-service-v1.txt",
        CgroupInfo("/system.slice/sshd.service", systemd_unit="sshd.service"),
        id="systemd service cgroup v1 (name=systemd hierarchy)",
    ),
    pytest.param(
        "user-session-v2.txt",
        CgroupInfo("/user.slice/user-1000.slice/session-3.scope", systemd_unit="session-3.scope"),
        id="systemd login session",
    ),
    pytest.param(
        "user-service-v2.txt",
        CgroupInfo(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/pipewire.service",
            systemd_unit="pipewire.service",
        ),
        id="systemd user service under user@1000.service",
    ),
    pytest.param(
        "user-manager-v2.txt",
        CgroupInfo("/user.slice/user-1000.slice/user@1000.service/init.scope", systemd_unit="user@1000.service"),
        id="systemd --user manager itself: its unit is user@1000.service",
    ),
    pytest.param("host-init-v2.txt", CgroupInfo("/init.scope", systemd_unit="init.scope"), id="host init (PID 1)"),
    pytest.param("kernel-thread-v2.txt", CgroupInfo("/"), id="kernel thread in the root cgroup"),
]


@pytest.mark.parametrize(("fixture", "expected"), CASES)
def test_parse_cgroup_reads_each_runtime_layout(fixture: str, expected: CgroupInfo) -> None:
    assert parse_cgroup((FIXTURES / fixture).read_text()) == expected


def test_every_fixture_has_a_case() -> None:
    covered = {case.values[0] for case in CASES}
    assert covered == {path.name for path in FIXTURES.glob("*.txt")}


def test_crio_cgroupfs_manager_directory_has_no_scope_suffix() -> None:
    text = f"0::/kubepods/burstable/pod{CRIO_POD}/crio-{CRIO}\n"
    assert parse_cgroup(text) == CgroupInfo(
        f"/kubepods/burstable/pod{CRIO_POD}/crio-{CRIO}", CRIO, "cri-o", CRIO_POD, "burstable"
    )


def test_innermost_container_wins_for_docker_in_docker() -> None:
    outer, inner = DOCKER_V2_CGROUPFS, DOCKER_V2_SYSTEMD
    assert parse_cgroup(f"0::/docker/{outer}/docker/{inner}\n").container_id == inner


def test_v1_without_systemd_hierarchy_names_no_unit() -> None:
    # A v1 host whose init is not systemd: controller paths may look like units but nothing says so.
    info = parse_cgroup("3:cpu,cpuacct:/system.slice/foo.service\n2:memory:/\n")
    assert info == CgroupInfo("/system.slice/foo.service")


@pytest.mark.parametrize(
    "text",
    ["", "garbage\n", "0::relative/path\n", "1:name=systemd\n"],
    ids=["empty", "no fields", "relative path", "missing path"],
)
def test_malformed_input_gives_empty_info(text: str) -> None:
    assert parse_cgroup(text) == CgroupInfo()


def test_path_with_colon_is_kept_whole() -> None:
    assert parse_cgroup("0::/system.slice/odd:name.service\n").systemd_unit == "odd:name.service"


def test_short_hex_component_is_not_a_container() -> None:
    assert parse_cgroup("0::/docker/abcdef012345\n").container_id == ""
