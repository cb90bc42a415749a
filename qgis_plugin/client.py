"""DEALER client for the TerraScope worker, used by the QGIS plugin and the ``terrascope`` CLI.

Torch-free and QGIS-free (numpy + pyzmq >= 24). Every wait is bounded: a worker that is dead,
hung, unreachable or refuses our CURVE key raises :class:`WorkerUnavailable` within
``timeout_s`` (default 4 s). Once an ``ask`` is running (not while it waits in the queue) the
client pings every ``heartbeat_s`` and names the job, so a worker can cancel jobs whose client went
away. Queued asks stay silent: in a pool every message passes a round-robin DEALER, and pings of
waiting clients would make the spread of asks over the members random.

One client = one socket = one thread at a time. Use a client per QgsTask/thread; cancel an
``ask`` through its ``should_cancel`` callback, not from another thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import zmq

from . import protocol as P

EventCallback = Callable[[dict, dict], None]
#: Events consumed by the client itself and not passed to ``on_event``.
_INTERNAL_EVENTS = ("alive", "pong", "ack")
#: A running job's first keepalive ping goes out this many ``heartbeat_s`` after the client sees it running.
FIRST_PING_HEARTBEATS = 1.5
#: How long this process's clients reuse an endpoint's ``info`` for its size limit (``ask``) and, from a ready
#: worker, for the plugin's readiness check. Why: behind a pool's DEALER every message takes a round-robin
#: turn. A new client sent an ``info`` before each big ask, so one client per ask (the plugin's tasks) sent
#: every ask to the same member, and 8 clients starting together dealt 18 / 14 instead of 16 / 16.
INFO_TTL_S = 60.0
_INFOS: dict[str, tuple[dict, float]] = {}  # endpoint -> (its last info event, when it came)
_INFO_LOCK = threading.Lock()
_LEARN_LOCK = threading.Lock()  # one info in flight per process for the size limit
#: Events only a running job sends: seeing one starts the keepalive pings.
_RUNNING_EVENTS = ("token", "mask", "progress")


class WorkerUnavailable(Exception):
    """No worker answered in time (not running, crashed, hung, or refused our key)."""


class WorkerError(Exception):
    """The worker answered with an ``error`` event: ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str, event: dict | None = None):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.event = event or {}


def read_key(value: str | bytes | os.PathLike | None) -> bytes | None:
    """A z85 CURVE key given inline (40 chars) or as a file written by ``terrascope keys``."""
    if value is None:
        return None
    if isinstance(value, bytes):
        key = value.strip()
    elif isinstance(value, str) and len(value.strip()) == 40 and not os.path.exists(value):
        key = value.strip().encode("ascii")
    else:
        with open(value, "rb") as fh:
            key = fh.read().strip()
    if len(key) != 40:
        raise ValueError(f"a CURVE key is 40 z85 characters; got {len(key)} from {value!r}")
    return key


class WorkerClient:
    """Talks to one worker (or pool) endpoint.

    ``curve_server_key``: the worker's public key (z85 or key file) when it runs with CURVE.
    ``curve_client_keys``: (public, secret) of this client; generated when None (accepted by a
    worker that allows any key holder of its public key).
    """

    def __init__(
        self,
        endpoint: str = P.DEFAULT_ENDPOINT,
        timeout_s: float = 4.0,
        curve_server_key: str | bytes | None = None,
        curve_client_keys: tuple[Any, Any] | None = None,
        *,
        heartbeat_s: float = 1.0,
        limits: P.Limits | None = None,
        context: zmq.Context | None = None,
    ):
        if timeout_s <= 0 or heartbeat_s <= 0:
            raise ValueError("timeout_s and heartbeat_s must be positive")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = min(float(heartbeat_s), self.timeout_s / 3)
        # Incoming messages may be large (masks on the request grid): allow up to 4 GiB.
        self.limits = limits or P.Limits(max_message_bytes=1 << 32, max_header_bytes=64 << 20)
        self.max_send_bytes = P.Limits().max_message_bytes
        self._limit_known = False  # learnt from ``info``; until then a big ask asks for it first
        self._server_key = read_key(curve_server_key)
        if curve_client_keys is not None:
            self._client_keys = (read_key(curve_client_keys[0]), read_key(curve_client_keys[1]))
        elif self._server_key is not None:
            pub, sec = zmq.curve_keypair()
            self._client_keys = (pub, sec)
        else:
            self._client_keys = None
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._lock = threading.Lock()

    # --- socket lifecycle -------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            # IMMEDIATE: queue nothing for peers that are not connected (or failed the CURVE
            # handshake), so "nobody there" shows as a bounded send wait instead of silence.
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.setsockopt(zmq.RCVHWM, 0)
            if self._server_key is not None:
                s.curve_serverkey = self._server_key
                s.curve_publickey, s.curve_secretkey = self._client_keys
            s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 4000)
            # Connection events let an ask notice a worker that died (its socket closed) at once,
            # instead of waiting for the heartbeat timeout.
            self._monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        """Drop the socket: after a timeout its queues may hold stale traffic."""
        if self._sock is not None:
            if self._monitor is not None:
                try:
                    self._sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                self._monitor.close(linger=0)
                self._monitor = None
            self._sock.close(linger=0)
            self._sock = None

    def _disconnected(self) -> bool:
        """True if the connection to the worker dropped since the last call (drains the events)."""
        seen = False
        while self._monitor is not None and self._monitor.poll(0):
            frames = self._monitor.recv_multipart()
            event = int.from_bytes(frames[0][:2], "little")
            seen = seen or event == zmq.EVENT_DISCONNECTED
        return seen

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> WorkerClient:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- low level --------------------------------------------------------------------------
    def _send(
        self, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None, wait: bool = True
    ) -> bool:
        """Sends within ``timeout_s`` or raises WorkerUnavailable; with ``wait=False`` tries once."""
        frames = P.encode_message(header, arrays)
        size = P.message_nbytes(frames)
        if size > self.max_send_bytes:
            raise WorkerError(
                P.TOO_LARGE, f"request is {size} bytes; the worker accepts at most {self.max_send_bytes}"
            )
        sock = self._socket()
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                sock.send_multipart([b""] + frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if not wait:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    self._reset()
                    raise WorkerUnavailable(
                        f"no TerraScope worker reachable at {self.endpoint} within {self.timeout_s:g} s "
                        "(not running, or it refused our CURVE key)"
                    ) from None
                sock.poll(min(100, max(1, int(left * 1000))), zmq.POLLOUT)

    def _recv(self, wait_s: float) -> tuple[dict, dict] | None:
        """One decoded message, or None after ``wait_s``. Malformed worker messages raise WorkerError."""
        sock = self._socket()
        if not sock.poll(max(0, int(wait_s * 1000)), zmq.POLLIN):
            return None
        frames = sock.recv_multipart(copy=False)
        if len(frames) < 2 or len(frames[0].buffer) != 0:
            raise WorkerError(P.BAD_FRAME, "the worker sent a message without the empty delimiter frame")
        try:
            return P.decode_message(frames[1:], self.limits)
        except P.ProtocolError as exc:
            raise WorkerError(exc.code, f"malformed message from the worker: {exc.message}") from None

    def _call(self, op: str, **fields: Any) -> dict:
        """A request with a single reply event (ping, info, cancel, shutdown)."""
        return self._call_arrays(op, None, **fields)[0]

    def _call_arrays(
        self, op: str, arrays: Mapping[str, np.ndarray] | None, **fields: Any
    ) -> tuple[dict, dict[str, np.ndarray]]:
        with self._exclusive():
            header = P.request(op, **fields)
            self._send(header, arrays)
            deadline = time.monotonic() + self.timeout_s
            while True:
                left = deadline - time.monotonic()
                msg = self._recv(left) if left > 0 else None
                if msg is None:
                    self._reset()
                    raise WorkerUnavailable(
                        f"the TerraScope worker at {self.endpoint} did not answer '{op}' within {self.timeout_s:g} s"
                    )
                ev, ev_arrays = msg
                if ev.get("id") != header["id"]:
                    continue  # stale reply to an earlier, abandoned request
                if ev.get("event") == "error":
                    raise WorkerError(str(ev.get("code")), str(ev.get("message")), ev)
                return ev, ev_arrays

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this WorkerClient is in use by another call; use one client per thread")
        try:
            yield
        finally:
            self._lock.release()

    # --- public -----------------------------------------------------------------------------
    def ping(self) -> dict:
        """The ``pong`` event: {state, queue_length, max_queue, running, pid, time}."""
        return self._call("ping")

    def info(self, max_age_s: float | None = None, *, ready_only: bool = True) -> dict:
        """The ``info`` event (model, device, GPU, versions, limits). Also learns the worker's size limit.

        With ``max_age_s``, an info this process got from the endpoint less than that long ago is returned
        instead of asking again (only a ``ready`` worker's, unless ``ready_only`` is False)."""
        if max_age_s is not None:
            with _INFO_LOCK:
                hit = _INFOS.get(self.endpoint)
            if (hit is not None and time.monotonic() - hit[1] < max_age_s
                    and (hit[0].get("state") == "ready" or not ready_only)):
                return self._learn(dict(hit[0]))
        ev = self._learn(self._call("info"))
        with _INFO_LOCK:
            _INFOS[self.endpoint] = (dict(ev), time.monotonic())
        return ev

    def _learn(self, ev: dict) -> dict:
        limit = (ev.get("limits") or {}).get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            self.max_send_bytes = limit
            self._limit_known = True
        return ev

    def _learn_limit(self) -> None:
        """The worker's size limit from this process's last ``info`` to the endpoint (``INFO_TTL_S``), else from
        a new one; concurrent first asks wait for a single ``info`` (see ``INFO_TTL_S`` for why)."""
        with _LEARN_LOCK:
            self.info(INFO_TTL_S, ready_only=False)

    def echo(self, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        """Round trip of ``arrays`` through the worker (diagnostics and the protocol benchmark)."""
        return self._call_arrays("echo", arrays)

    def cancel(self, target_id: str) -> dict:
        return self._call("cancel", target=target_id)

    def shutdown(self) -> dict:
        """Asks the worker (or every worker of a pool) to stop; returns its ``bye``."""
        return self._call("shutdown")

    def ask(
        self,
        request_header: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray] | None = None,
        on_event: EventCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        *,
        max_wait_s: float | None = None,
    ) -> dict:
        """Sends an ``ask`` and streams its events to ``on_event(header, arrays)`` until ``done``.

        Returns the ``done`` event. Raises WorkerError (``error`` event, including ``cancelled``
        after ``should_cancel()`` turned true) or WorkerUnavailable (no event for this job within
        ``timeout_s``: the worker died or hung). ``max_wait_s`` bounds the whole call if given.
        """
        if not self._limit_known and arrays and sum(np.asarray(a).nbytes for a in arrays.values()) > 1 << 20:
            # a frame over the worker's limit is dropped by libzmq with the connection, unanswered:
            # learn the limit first so that such a request fails here with ``too_large``
            self._learn_limit()
        with self._exclusive():
            header = dict(request_header)
            header.setdefault("protocol", P.PROTOCOL_VERSION)
            header["op"] = "ask"
            header.setdefault("id", P.new_id())
            header["client_heartbeat_s"] = self.heartbeat_s
            rid = header["id"]
            self._socket()
            self._disconnected()  # forget drops that happened before this request
            self._send(header, arrays)
            try:
                return self._stream(rid, on_event, should_cancel, max_wait_s)
            except BaseException as exc:
                # Our side gave up (error in a callback, Ctrl-C, timeout): stop the job if we can.
                if not (isinstance(exc, WorkerError) and exc.event) and self._sock is not None:
                    self._send(P.request("cancel", target=rid), wait=False)
                raise

    def _stream(
        self,
        rid: str,
        on_event: EventCallback | None,
        should_cancel: Callable[[], bool] | None,
        max_wait_s: float | None,
    ) -> dict:
        now = time.monotonic()
        last_seen = now
        # No pings until the job is seen running (alive state=running, or a token/mask/progress):
        # the worker judges a job's client only once it runs, and its liveness window counts from then.
        next_ping: float | None = None
        end = None if max_wait_s is None else now + max_wait_s
        cancel_sent = False
        while True:
            now = time.monotonic()
            if should_cancel is not None and not cancel_sent and should_cancel():
                self._send(P.request("cancel", target=rid), wait=False)
                cancel_sent = True
            if next_ping is not None and now >= next_ping:
                self._send(P.request("ping", active=[rid]), wait=False)
                next_ping = now + self.heartbeat_s
            if self._disconnected():
                self._reset()
                raise WorkerUnavailable(
                    f"the TerraScope worker at {self.endpoint} closed the connection during request {rid}: "
                    "it stopped or crashed"
                )
            if now - last_seen > self.timeout_s:
                self._reset()
                raise WorkerUnavailable(
                    f"the TerraScope worker at {self.endpoint} stopped responding "
                    f"(no message for request {rid} in {self.timeout_s:g} s): it may have crashed"
                )
            if end is not None and now > end:
                raise WorkerError(P.CANCELLED, f"no answer within {max_wait_s:g} s; the request was cancelled")
            wait = 0.1 if next_ping is None else min(0.1, max(0.0, next_ping - now))
            msg = self._recv(wait)
            if msg is None:
                continue
            ev, ev_arrays = msg
            if ev.get("id") != rid:
                continue
            last_seen = time.monotonic()
            name = ev.get("event")
            if name == "error":
                raise WorkerError(str(ev.get("code")), str(ev.get("message")), ev)
            if next_ping is None and (name in _RUNNING_EVENTS or (name == "alive" and ev.get("state") == "running")):
                # the first ping 1.5 heartbeats into the run: an answer shorter than that (about a second on a
                # GPU) sends none, so in a pool only asks take the DEALER's turns; the worker's window,
                # max(3 hb, 3 s) from the start, still leaves 1.5 hb (>= 1.5 s) for the news to arrive
                next_ping = last_seen + FIRST_PING_HEARTBEATS * self.heartbeat_s
            if name in _INTERNAL_EVENTS:
                continue
            if on_event is not None:
                on_event(ev, ev_arrays)
            if name == "done":
                return ev
