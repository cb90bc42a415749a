"""CURVE: ``terrascope keys`` and a worker that serves only key holders."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
import zmq
from workerlib import REPO, RawDealer, free_tcp_endpoint, start_worker

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable


def _keys(folder) -> None:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "keys", str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def curve_worker(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "k"
    _keys(keys)
    wp = start_worker(
        tmp_path_factory.mktemp("curve"), "--curve-secret", str(keys / "server.secret"),
        "--client-key", str(keys / "client.public"), endpoint=free_tcp_endpoint(), ready=False,
        client_kw={"curve_server_key": keys / "server.public",
                   "curve_client_keys": (keys / "client.public", keys / "client.secret")},
    )
    yield wp, keys
    wp.stop()


def test_keys_are_private_files_and_never_overwritten(tmp_path) -> None:
    _keys(tmp_path / "k")
    for name in ("server.public", "server.secret", "client.public", "client.secret"):
        f = tmp_path / "k" / name
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert len(f.read_bytes().strip()) == 40
    before = (tmp_path / "k" / "server.secret").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "keys", str(tmp_path / "k")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert (tmp_path / "k" / "server.secret").read_bytes() == before


def test_the_key_holder_is_served(curve_worker) -> None:
    wp, keys = curve_worker
    with WorkerClient(wp.endpoint, timeout_s=3, curve_server_key=keys / "server.public",
                      curve_client_keys=(keys / "client.public", keys / "client.secret")) as c:
        assert c.ping()["event"] == "pong"
        assert c.info()["curve"] is True


def test_a_client_without_the_key_gets_nothing(curve_worker) -> None:
    wp, keys = curve_worker
    # plain (no CURVE) client: the handshake never completes, so no request is even delivered
    with WorkerClient(wp.endpoint, timeout_s=1.5) as c, pytest.raises(WorkerUnavailable):
        c.ping()
    raw = RawDealer(wp.endpoint)
    try:
        # the DEALER may not even take the frames (no connection while the handshake is refused): also nothing
        if raw.try_send([b""] + P.encode_message(P.request("info"))):
            assert raw.recv(1.5) is None
    finally:
        raw.close()
    # right server key but a client key the worker does not list: refused by the ZAP handler
    other_pub, other_sec = zmq.curve_keypair()
    with WorkerClient(wp.endpoint, timeout_s=1.5, curve_server_key=keys / "server.public",
                      curve_client_keys=(other_pub, other_sec)) as c, pytest.raises(WorkerUnavailable):
        c.ping()
    # a wrong server key: the client cannot complete the handshake either
    wrong_pub, _ = zmq.curve_keypair()
    with WorkerClient(wp.endpoint, timeout_s=1.5, curve_server_key=wrong_pub,
                      curve_client_keys=(keys / "client.public", keys / "client.secret")) as c, \
            pytest.raises(WorkerUnavailable):
        c.ping()
    assert wp.proc.poll() is None  # and the worker is unharmed
