"""Security (issue 7, part 5): loopback by default, CURVE required elsewhere and enforced, no pickle
on the wire or in checkpoints, no remote file paths outside the allow-list."""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq
from relharness import (
    DATA,
    FIXTURE,
    REPO,
    RawClient,
    WorkerProc,
    ask,
    assert_error,
    assert_served,
    needs_model,
    worker_env,
)

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError, WorkerUnavailable

pytestmark = needs_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _listening(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == "LISTEN"}


def _host_ip() -> str:
    """An address of this machine that is not loopback (127.0.0.1 if it has none)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def terrascope(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


# --- binding --------------------------------------------------------------------------------------------
def test_the_default_endpoint_is_loopback() -> None:
    from worker.cli import build_parser
    from worker.service import ServiceConfig, is_loopback

    args = build_parser().parse_args(["worker"])
    assert args.endpoint == P.DEFAULT_ENDPOINT == "tcp://127.0.0.1:5557"
    assert ServiceConfig().endpoint == P.DEFAULT_ENDPOINT and is_loopback(P.DEFAULT_ENDPOINT)
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5557)) == 0:
            pytest.skip("port 5557 is in use on this machine: cannot start a worker on the default endpoint")
    w = WorkerProc(endpoint=None).start()  # no --endpoint at all; it listens before the model loads
    try:
        assert w.endpoint == "tcp://127.0.0.1:5557"
        assert _listening(w.pid) == {"127.0.0.1"}
    finally:
        w.kill()


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "[::]", "HOST_IP", "eth0", "example.org"])
def test_a_non_loopback_bind_without_curve_is_refused(host: str) -> None:
    host = _host_ip() if host == "HOST_IP" else host
    if host == "127.0.0.1":
        pytest.skip("this machine has no non-loopback address")
    port = _free_port()
    t0 = time.monotonic()
    for extra in ([], ["--workers", "2"]) if host == "0.0.0.0" else ([],):  # a pool is refused the same
        proc = terrascope("worker", "--endpoint", f"tcp://{host}:{port}", "--model", str(FIXTURE), *extra)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "refusing" in lines[0] and "CURVE" in lines[0] and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "something listens on the refused port"


def test_the_service_api_refuses_it_too() -> None:
    from worker.service import ServiceConfig, WorkerService

    service = WorkerService(ServiceConfig(endpoint=f"tcp://0.0.0.0:{_free_port()}"), loader=lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="CURVE"):
        service.start()


# --- CURVE on all interfaces -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "k"
    proc = terrascope("keys", str(folder))
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """allowed/scene.tif, allowed/link.tif -> outside.tif, allowed-evil/scene.tif, outside.tif"""
    root = tmp_path_factory.mktemp("paths")
    allowed = root / "allowed"
    allowed.mkdir()
    sample = DATA / "fair_zanzibar" / "OAM-319295-270960-19.tif"
    shutil.copy(sample, allowed / "scene.tif")
    (root / "allowed-evil").mkdir()
    shutil.copy(sample, root / "allowed-evil" / "scene.tif")
    shutil.copy(sample, root / "outside.tif")
    (allowed / "link.tif").symlink_to(root / "outside.tif")
    return root


@pytest.fixture(scope="module")
def curve_worker(keys: Path, files_root: Path) -> Iterator[WorkerProc]:
    """CURVE on all interfaces, one allowed client key, and an --allow-path folder."""
    port = _free_port()
    w = WorkerProc("--curve-secret", str(keys / "server.secret"), "--client-key", str(keys / "client.public"),
                   "--allow-path", str(files_root / "allowed"), endpoint=f"tcp://0.0.0.0:{port}")
    w.client_kw = {"curve_server_key": keys / "server.public",
                   "curve_client_keys": (keys / "client.public", keys / "client.secret")}
    w.start()
    w.endpoint = f"tcp://{_host_ip()}:{port}"  # reach it the way another machine would
    w.wait_ready()
    yield w
    w.stop()


def test_curve_worker_listens_on_all_interfaces_and_serves_the_key_holder(curve_worker: WorkerProc) -> None:
    assert _listening(curve_worker.pid) == {"0.0.0.0"}
    with curve_worker.client() as c:
        assert c.info()["curve"] is True
        assert c.ask(*ask(max_new_tokens=2))["event"] == "done"


def test_a_client_without_the_key_gets_no_service(curve_worker: WorkerProc, keys: Path) -> None:
    """Plain, wrong-client-key and wrong-server-key clients: nothing they send reaches the worker."""
    with curve_worker.client() as c:
        received = c.info()["stats"]["received"]
    other_pub, other_sec = zmq.curve_keypair()
    wrong_server, _ = zmq.curve_keypair()
    intruders = [
        {},  # no CURVE at all
        {"curve_server_key": keys / "server.public", "curve_client_keys": (other_pub, other_sec)},
        {"curve_server_key": wrong_server,
         "curve_client_keys": (keys / "client.public", keys / "client.secret")},
    ]
    for kw in intruders:
        with WorkerClient(curve_worker.endpoint, timeout_s=0.8, **kw) as c, pytest.raises(WorkerUnavailable):
            c.ping()
    with WorkerClient(curve_worker.endpoint, timeout_s=0.8) as c, pytest.raises(WorkerUnavailable):
        c.ask(*ask(max_new_tokens=2))
    raw = RawClient(curve_worker.endpoint)
    # plain text: never delivered, whether a half-open connection queues it or none takes it at all
    raw.try_send(P.encode_message(P.request("shutdown")))
    assert raw.recv(0.8) is None
    raw.sock.close(0)
    with curve_worker.client() as c:
        stats = c.info()["stats"]
    assert stats["received"] == received + 1, "a message from a client without the key reached the worker"
    assert curve_worker.alive()


# --- no pickle ----------------------------------------------------------------------------------------
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _python_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    return [REPO / f for f in files if (REPO / f).is_file()]


def _pickle_uses(path: Path, root: Path = REPO) -> list[str]:
    """Pickle imports (tests may import it to *build* hostile pickles, never to load one), unpickling
    calls, torch.load without weights_only=True, numpy loads with allow_pickle=True, pandas pickles."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_test = path.relative_to(root).parts[0] == "tests"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and not is_test:
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            kw = {k.arg: k.value for k in node.keywords}
            if owner.split(".")[0] in _PICKLE_MODULES and name in ("load", "loads", "Unpickler"):
                found.append(f"line {node.lineno}: {owner}.{name}")
            elif name == "load" and owner == "torch":
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            elif name in ("load", "loadtxt") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value is True:
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}(allow_pickle=True)")
            elif name in ("read_pickle", "to_pickle"):
                found.append(f"line {node.lineno}: {name}")
    return [f"{path.relative_to(root)}: {u}" for u in found]


def test_no_pickle_anywhere_in_the_code() -> None:
    files = _python_files()
    assert len(files) > 30 and any(f.name == "loading.py" for f in files)
    uses = [u for f in files for u in _pickle_uses(f)]
    assert not uses, "pickle found:\n" + "\n".join(uses)


def test_the_scanner_catches_pickle(tmp_path: Path) -> None:
    """The check above can fail: it flags every form it looks for."""
    bad = tmp_path / "bad.py"
    bad.write_text("import dill\nfrom pickle import loads\nimport torch, numpy as np\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
                   "df.to_pickle('x')\ntorch.load('x', weights_only=True)\npickle.loads(b'')\n")
    found = _pickle_uses(bad, tmp_path)
    assert len(found) == 7, found
    test_dir = tmp_path / "tests"
    test_dir.mkdir()
    (test_dir / "t.py").write_text("import pickle\npickle.dumps(1)\npickle.load(f)\n")
    assert [u.split(": ", 1)[1] for u in _pickle_uses(test_dir / "t.py", tmp_path)] == ["line 3: pickle.load"]


def test_no_pickled_files_are_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    bad = [f for f in tracked.split() if f.rsplit(".", 1)[-1].lower() in ("pkl", "pickle", "pt", "pth", "bin",
                                                                         "ckpt", "joblib")]
    assert not bad, bad


# A protocol-0 pickle that runs `touch MARKER` when unpickled: built by hand, so this file needs no pickle.
def _evil_pickle(marker: Path) -> bytes:
    return b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def test_pickle_payloads_on_the_wire_are_never_unpickled(raw: RawClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_pickle(marker)
    raw.send([evil])
    assert_error(raw.reply(None), P.BAD_JSON)
    header = {"protocol": 1, "id": "evil", "op": "echo", "arrays": [{"name": "a", "dtype": "O", "shape": [1]}]}
    raw.send([P.dumps(header), evil])
    assert_error(raw.reply("evil"), P.BAD_ARRAY)
    assert_served(raw)
    assert not marker.exists()


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    """A checkpoint folder whose weights are a malicious pickle: loading refuses it, says why, and
    the payload never runs (the worker reports this error as ``model_unavailable``)."""
    from model.api import TerraScope
    from model.loading import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    (ckpt / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (ckpt / "pytorch_model.bin").write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError) as exc:
        TerraScope.load(str(ckpt), device="cpu")
    assert "pytorch_model.bin" in str(exc.value) and "pickle" in str(exc.value)
    assert not marker.exists()


# --- remote file paths -------------------------------------------------------------------------------
def _path_ask(path: str) -> tuple[dict, dict]:
    return P.request("ask", question="Where are the buildings?", images=[{"path": path, "role": "optical"}],
                     settings={"max_new_tokens": 2}), {}


def test_an_allow_listed_file_is_read(curve_worker: WorkerProc, files_root: Path) -> None:
    with curve_worker.client() as c:
        assert c.ask(*_path_ask(str(files_root / "allowed" / "scene.tif")))["event"] == "done"


@pytest.mark.parametrize("where", ["outside.tif", "allowed/link.tif", "allowed/../outside.tif",
                                   "allowed-evil/scene.tif", "/etc/passwd", "/proc/self/environ"])
def test_paths_outside_the_allow_list_are_refused(curve_worker: WorkerProc, files_root: Path, where: str) -> None:
    with curve_worker.client() as c:
        with pytest.raises(WorkerError) as exc:
            c.ask(*_path_ask(where if where.startswith("/") else f"{files_root}/{where}"))
        assert_error(exc.value.event, P.PATH_NOT_ALLOWED)
        assert "allow-path" in exc.value.message
        assert c.ask(*ask(max_new_tokens=2))["event"] == "done"


def test_a_missing_allow_listed_file_is_a_clear_error(curve_worker: WorkerProc, files_root: Path) -> None:
    with curve_worker.client() as c:
        with pytest.raises(WorkerError) as exc:
            c.ask(*_path_ask(str(files_root / "allowed" / "nope.tif")))
        assert_error(exc.value.event, P.BAD_RASTER)
        assert "nope.tif" in exc.value.message
        assert c.ask(*ask(max_new_tokens=2))["event"] == "done"
