"""Your own software in the guest, end to end: an image spec with one extra Debian package,
one pip requirement, copied files, a user Python service (the kvstore example) and a
supervised non-Python command serving its own vsock port.

From the host: the service answers through its own stubs, health and reflection report it,
the package, the pip distribution and the files are in the guest (exec), the command's port
answers through the vsock device. Editing the service's code rebuilds only the top layer and
the next boot serves the new code; the top layer rebuilds byte-identical; a registrar that
raises makes ``vm run --spec`` fail fast with the guest's traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.vm.conftest import process_alive
from vsockrpc import rpc, transport
from vsockrpc.image import ImageInfo, build_image, manage
from vsockrpc.payload import load_spec
from vsockrpc.proto import vsock_service_pb2 as pb
from vsockrpc.proto import vsock_service_pb2_grpc as pb_grpc
from vsockrpc.sdk import Guest
from vsockrpc.vm import Vm, launch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "kvstore"))
from kvstore import kvstore_pb2 as kv_pb  # noqa: E402
from kvstore import kvstore_pb2_grpc as kv_grpc  # noqa: E402

# A cold build of the spec's base layer (mmdebstrap with the extra package) comes first.
pytestmark = pytest.mark.timeout(900)

KEYVALUE = "kvstore.v1.KeyValue"
PROBE_PORT = 7000
NAME = "vsockrpc-test-spec"
EDITED = f"{NAME}-edited"
SPEC = f"""\
name = "{NAME}"
apt = ["tree"]
pip = ["vsrpc-hello==1.0"]
pip_find_links = "wheels"

[env]
KVSTORE_MAX_VALUE = "16"

[[copy]]
source = "motd.txt"
dest = "/etc/vsockrpc-test/motd.txt"
mode = "0600"

[[copy]]
source = "guest_probe"
dest = "/usr/local/bin/guest_probe"

[[service]]
register = "kvstore.service:register"
source = "kvstore"

[[command]]
name = "probe"
argv = ["/usr/local/bin/guest_probe", "serve", "{PROBE_PORT}"]
restart = "always"
ready = "vsock:{PROBE_PORT}"
"""


def _wheel(directory: Path) -> None:
    """A minimal pure-Python wheel (PEP 427): vsrpc_hello 1.0."""
    files = {
        "vsrpc_hello/__init__.py": b'GREETING = "hello from a pip requirement"\n',
        "vsrpc_hello-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: vsrpc-hello\n"
        b"Version: 1.0\n",
        "vsrpc_hello-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: vsockrpc-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()
    )
    files["vsrpc_hello-1.0.dist-info/RECORD"] = (
        record + "vsrpc_hello-1.0.dist-info/RECORD,,\n"
    ).encode()
    with zipfile.ZipFile(directory / "vsrpc_hello-1.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project directory: the spec, a wheel, files, the kvstore package."""
    root = tmp_path_factory.mktemp("project")
    (root / "wheels").mkdir()
    _wheel(root / "wheels")
    (root / "motd.txt").write_text("copied by the image spec\n")
    subprocess.run(
        [
            "gcc",
            "-static",
            "-O2",
            "-o",
            str(root / "guest_probe"),
            str(ROOT / "tests/vm/guest_probe.c"),
        ],
        check=True,
        timeout=120,
    )
    shutil.copytree(
        ROOT / "examples/kvstore/kvstore",
        root / "kvstore",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (root / "vsockrpc.toml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def built(project: Path) -> ImageInfo:
    start = time.monotonic()
    info = build_image(spec=load_spec(project / "vsockrpc.toml"), name=NAME)
    print(f"\nspec image: {time.monotonic() - start:.1f} s (hit={info.cache_hit})", flush=True)
    return info


@pytest.fixture(scope="module")
def spec_vm(built: ImageInfo) -> Iterator[tuple[Vm, dict[str, float]]]:
    """The booted guest, plus boot → first answer of Addition and of KeyValue (same run)."""
    machine = launch(built, wait=False)
    pids = [machine.qemu.pid] + ([machine.device.pid] if machine.device else [])
    answered: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 240
        while len(answered) < 2 and time.monotonic() < deadline:
            assert machine.running(), machine.console_text()[-2000:]
            with rpc.channel(machine.address()) as ch:
                calls = {
                    "Addition": lambda: pb_grpc.VsockServiceStub(ch).Addition(  # type: ignore[no-untyped-call]
                        pb.AdditionRequest(a=1, b=2), timeout=2
                    ),
                    "KeyValue": lambda: kv_grpc.KeyValueStub(ch).Get(  # type: ignore[no-untyped-call]
                        kv_pb.GetRequest(key="nothing"), timeout=2
                    ),
                }
                for name, call in calls.items():
                    if name in answered:
                        continue
                    try:
                        call()
                        answered[name] = time.monotonic() - machine.timings.launched
                    except grpc.RpcError as err:
                        if err.code() == grpc.StatusCode.NOT_FOUND:  # the service answered
                            answered[name] = time.monotonic() - machine.timings.launched
            time.sleep(0.05)
        assert len(answered) == 2, f"not answered: {answered}"
        print(f"\nboot → first answer: {answered}", flush=True)
        machine.wait_ready(120)  # and the supervised command's port
        yield machine, answered
    finally:
        machine.stop()
        assert not [pid for pid in pids if process_alive(pid)]


def test_user_service_answers_through_its_own_stubs_and_health_reports_it(
    spec_vm: tuple[Vm, dict[str, float]],
) -> None:
    vm, _ = spec_vm
    with rpc.channel(vm.address()) as ch:
        kv = kv_grpc.KeyValueStub(ch)  # type: ignore[no-untyped-call]
        assert kv.Put(kv_pb.PutRequest(key="a/1", value=b"one"), timeout=30).version == 1
        assert kv.Put(kv_pb.PutRequest(key="a/2", value=b"two"), timeout=30).version == 1
        assert [e.key for e in kv.Scan(kv_pb.ScanRequest(prefix="a/"), timeout=30)] == [
            "a/1",
            "a/2",
        ]
        with pytest.raises(grpc.RpcError) as info:  # KVSTORE_MAX_VALUE from the spec's env
            kv.Put(kv_pb.PutRequest(key="big", value=b"x" * 17), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(ch)
        for name in (KEYVALUE, "popovicu_vsock.VsockService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert f"user service kvstore.service:register: {KEYVALUE}" in vm.console_text()


def test_apt_package_pip_requirement_and_copied_files_are_in_the_guest(
    spec_vm: tuple[Vm, dict[str, float]], built: ImageInfo
) -> None:
    vm, _ = spec_vm
    with Guest(vm.address(), wait=60) as g:
        tree = g.run(["tree", "--version"], timeout=60)
        assert tree.exit_code == 0 and tree.stdout.startswith(b"tree v2"), tree
        hello = g.run(["python3", "-c", "import vsrpc_hello; print(vsrpc_hello.GREETING)"])
        assert hello.stdout == b"hello from a pip requirement\n", hello
        motd = g.run(["stat", "-c", "%a %U", "/etc/vsockrpc-test/motd.txt"])
        assert motd.stdout == b"600 root\n", motd
        assert g.run(["cat", "/etc/vsockrpc-test/motd.txt"]).stdout == b"copied by the image spec\n"
        probe = g.run(["stat", "-c", "%a", "/usr/local/bin/guest_probe"])
        assert probe.stdout == b"755\n"
    wheels = built.manifest["spec"]["wheels"]
    assert list(wheels) == ["vsrpc_hello-1.0-py3-none-any.whl"]
    assert "tree" in built.manifest["packages"]


def test_supervised_command_serves_its_own_vsock_port_to_the_host(
    spec_vm: tuple[Vm, dict[str, float]],
) -> None:
    vm, _ = spec_vm
    text = vm.console_text()
    assert f"vsockrpc-guest: command probe ready (vsock:{PROBE_PORT})" in text
    assert f"[probe] PROBE-LISTEN vsock {PROBE_PORT}" in text
    with transport.connect(vm.address(PROBE_PORT), timeout=30) as sock:
        sock.settimeout(30)
        sock.sendall(b"Eping from the host")
        sock.shutdown(1)  # SHUT_WR: the probe echoes until EOF
        echoed = b""
        while chunk := sock.recv(4096):
            echoed += chunk
    assert echoed == b"ping from the host"


def test_editing_the_service_rebuilds_only_the_top_layer_and_serves_the_new_code(
    project: Path, built: ImageInfo
) -> None:
    service = project / "kvstore" / "service.py"
    original = service.read_text()
    # The marker makes this run's edit new to the shared image cache, so an edit an earlier run
    # already built cannot turn the rebuild into a cache hit.
    service.write_text(
        original.replace("version = self._data.get", "version = 100 + self._data.get")
        + f"\n# edited by run {uuid.uuid4().hex}\n"
    )
    try:
        start = time.monotonic()
        edited = build_image(spec=load_spec(project / "vsockrpc.toml"), name=EDITED)
        seconds = time.monotonic() - start
        print(f"\nrebuild after editing service code: {seconds:.1f} s", flush=True)
        start = time.monotonic()
        assert build_image(spec=load_spec(project / "vsockrpc.toml"), name=EDITED).cache_hit
        print(f"cache hit: {time.monotonic() - start:.2f} s", flush=True)
    finally:
        service.write_text(original)
    assert not edited.cache_hit and edited.path != built.path
    for layer in ("base", "python_layer", "busybox", "agent"):
        assert edited.manifest["inputs"][layer] == built.manifest["inputs"][layer], layer
    try:
        with launch(edited) as vm, rpc.channel(vm.address()) as ch:
            kv = kv_grpc.KeyValueStub(ch)  # type: ignore[no-untyped-call]
            assert kv.Put(kv_pb.PutRequest(key="k", value=b"v"), timeout=30).version == 101
    finally:
        # This run's edit is unique: its image is this run's own, and goes with it.
        assert manage.remove(EDITED, in_use=())


def test_the_top_layer_rebuilds_byte_identical(
    built: ImageInfo, tmp_path: Path, project: Path
) -> None:
    """A fresh cache root sharing only the lower layers: the image layer is built again."""
    shared = built.path.parents[1]
    fresh = tmp_path / "cache"
    fresh.mkdir()
    for kind in ("base", "python", "wheels", "debs", "apt"):
        if (shared / kind).exists():
            os.symlink(shared / kind, fresh / kind)
    again = build_image(spec=load_spec(project / "vsockrpc.toml"), cache_root=fresh)
    assert not again.cache_hit and again.path.parent == (fresh / "images").resolve()
    assert again.manifest["files"] == built.manifest["files"]
    assert json.dumps(again.manifest, sort_keys=True) == json.dumps(built.manifest, sort_keys=True)


def test_a_registrar_that_raises_fails_vm_run_fast_with_the_guest_traceback(
    project: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "api.py").write_text("def register(server):\n    raise RuntimeError('no database')\n")
    (tmp_path / "vsockrpc.toml").write_text(
        '[[service]]\nregister = "broken.api:register"\nsource = "broken"\n'
    )
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vsockrpc.cli.main",
            "vm",
            "run",
            "--quiet",
            "--spec",
            str(tmp_path / "vsockrpc.toml"),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert "guest: Traceback (most recent call last):" in lines
    error = next(ln for ln in lines if ln.startswith("vsockrpc: error: "))
    assert error.startswith("vsockrpc: error: guest agent crashed before it was ready")
    assert "user service broken.api:register raised in register: RuntimeError: no database" in error
    assert elapsed < 200  # failed on the guest's report, not on the 240 s timeout
