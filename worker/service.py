"""The TerraScope worker: one ZeroMQ ROUTER, one model, a bounded job queue.

Threads (sockets are never shared between threads):
- IO thread: owns the ROUTER (and, in a pool, the control-bus sockets). It decodes and validates
  every message, answers ``ping``/``info``/``cancel``/``shutdown`` at once - even while the model
  is busy - queues ``ask`` jobs, sends per-job ``alive`` heartbeats and forwards model events.
- Model thread: loads the model, then runs one job at a time. Its events reach the IO thread
  through an inproc PUSH/PULL pair, zero-copy.

A bad message becomes an ``error`` event for its sender and never stops the loop. A client that
disappears (ROUTER_MANDATORY send failure, or its pings stop while its job runs) gets its jobs
cancelled. Clients ping only for running jobs, so a queued job is never judged by missing pings.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zmq

from model.types import AnswerResult, GenerationSettings, ImageInput, MaskStep
from qgis_plugin import protocol as P
from worker import validate as V
from worker.windows import WindowDefaults

log = logging.getLogger("terrascope.worker")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class ModelLike(Protocol):
    def answer(
        self,
        images: list[ImageInput],
        question: str,
        options: list[str] | None = None,
        *,
        settings: GenerationSettings | None = None,
        on_token: Callable[[str], None] | None = None,
        on_mask: Callable[[MaskStep], None] | None = None,
        grounding: Callable[[MaskStep], str | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> AnswerResult: ...

    def info(self) -> dict: ...


@dataclass
class ServiceConfig:
    endpoint: str = P.DEFAULT_ENDPOINT
    bind: bool = True  # False: connect (a pool member connecting to the pool's proxy)
    hops: int = 1  # routing-id frames before the delimiter (2 behind the pool's proxy)
    max_queue: int = 8  # jobs waiting behind the running one; more -> "busy"
    limits: P.Limits = field(default_factory=P.Limits)
    allow_paths: Sequence[Path] = ()
    curve_secret: bytes | None = None  # z85 server secret key: enables CURVE
    client_keys: Sequence[bytes] | None = None  # z85 client public keys allowed; None = any
    heartbeat_s: float = 1.0  # per-job "alive" period
    max_side: int = 2048  # longest side of the model view of a raster
    bus_pub: str | None = None  # pool control bus (cancel/keepalive/shutdown across members)
    bus_sub: str | None = None
    pool_size: int = 1
    curve_in_front: bool = False  # a pool member whose pool's public socket uses CURVE
    model_label: str = ""  # what was asked for (path or preset), shown until the model reports itself
    # peak RSS one job may add before it fails with MemoryError -> "oom" (checked each decode step): a
    # soft host-memory cap, and how the reliability tests simulate running out of memory mid-generation.
    job_memory_budget: int | None = None
    # sliding-window mode (worker/windows.py): when "auto" windows a request, and the default tiles
    windows: WindowDefaults = field(default_factory=WindowDefaults)


def is_loopback(endpoint: str) -> bool:
    """True for endpoints that other machines cannot reach (no CURVE needed)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if endpoint.startswith("tcp://"):
        host = endpoint[6:].rsplit(":", 1)[0]
        return host in LOOPBACK_HOSTS
    return False


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    return name == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text or "not enough memory" in text)
    )


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim()


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int | None:
    """Current resident set size in bytes (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _start_peak_window() -> None:
    """Restart the process's peak-RSS (VmHWM) count, so it measures one job (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class JobQueue:
    """Bounded FIFO from which queued jobs can also be removed (a cancel frees its slot at once)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> int:
        """Position (1-based) of the job, or 0 when the queue is full."""
        with self._cond:
            if len(self._items) >= self.maxsize:
                return 0
            self._items.append(job)
            self._cond.notify()
            return len(self._items)

    def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._items.remove(job)
                return True
            except ValueError:
                return False

    def get(self) -> Job | None:
        """Next job, or None once closed."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            return self._items.popleft() if self._items else None

    def close(self) -> list[Job]:
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        return len(self._items)

    def position(self, job: Job) -> int:
        with self._cond:
            try:
                return self._items.index(job) + 1
            except ValueError:
                return 0


@dataclass(eq=False)
class Job:
    token: bytes  # internal handle used between the threads
    client: bytes  # the client's routing id (last envelope frame)
    envelope: list[bytes]
    request: V.AskRequest
    received: float
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued | running | finished (guarded by Service._lock)
    last_client_seen: float = 0.0  # guarded by Service._lock (IO thread pings, model thread at start)
    started: float = 0.0

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.request.id


class WorkerService:
    """Serve ``loader()``'s model on ``config.endpoint`` until ``shutdown`` or :meth:`stop`."""

    def __init__(self, config: ServiceConfig, loader: Callable[[], ModelLike], context: zmq.Context | None = None):
        self.config = config
        self._loader = loader
        self._ctx = context or zmq.Context.instance()
        self._queue = JobQueue(config.max_queue)
        self._jobs: dict[tuple[bytes, str], Job] = {}  # IO thread only
        self._by_token: dict[bytes, Job] = {}  # IO thread only
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self.endpoint: str | None = None
        self.state = "loading"  # loading | ready | failed
        self.load_error: str | None = None
        self.model: ModelLike | None = None
        self._model_info: dict[str, Any] = {"name": config.model_label or "?", "state": "loading"}
        self._events_ep = f"inproc://terrascope-events-{id(self)}"
        self._pending: dict[bytes, collections.deque] = {}
        self._pending_since: dict[bytes, float] = {}
        self._shutting_down = False
        self._io_thread = threading.Thread(target=self._io_main, name="terrascope-io", daemon=True)
        self._model_thread = threading.Thread(target=self._model_main, name="terrascope-model", daemon=True)
        self._auth = None
        self.stats = {"received": 0, "answered": 0, "errors": 0}

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> str:
        """Binds (or connects) and starts both threads; returns the actual endpoint."""
        if self.config.curve_secret is None and self.config.bind and not is_loopback(self.config.endpoint):
            raise ValueError(
                f"refusing to serve {self.config.endpoint} without authentication: binding a non-loopback "
                "address requires CURVE keys (create them with `terrascope keys DIR`, then pass --curve-secret)"
            )
        self._io_thread.start()
        if not self._bound.wait(timeout_s):
            raise RuntimeError("the worker's IO thread did not start")
        if self._bind_error is not None:
            raise self._bind_error
        self._model_thread.start()
        return self.endpoint or self.config.endpoint

    def stop(self) -> None:
        """Graceful stop from any thread (signal handlers, tests): like a ``shutdown`` op."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def serve_forever(self) -> None:
        self.start()
        while not self._done.wait(0.5):
            pass

    # --- model thread -------------------------------------------------------------------------
    def _model_main(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(self._events_ep)
        try:
            self._load_model()
            while True:
                job = self._queue.get()
                if job is None:
                    break
                with self._lock:
                    if job.state != "queued":
                        continue
                    job.state = "running"
                    # the client's liveness window counts from the start of the run (see _beat)
                    job.started = job.last_client_seen = time.monotonic()
                # tell the client at once, so that its pings start now and not at the next beat
                self._emit(push, job, P.event("alive", job.request.id, state="running", position=0))
                try:
                    self._run_job(job, push)
                except Exception:  # noqa: BLE001 - even the error event failed; end the job plainly
                    log.error("request %s: could not report its outcome:\n%s", job.request.id,
                              traceback.format_exc())
                    self._emit(push, job, P.error_event(job.request.id, P.INTERNAL, "internal error (see worker log)"))
        finally:
            push.close()

    def _load_model(self) -> None:
        t0 = time.monotonic()
        try:
            self.model = self._loader()
            info = dict(self.model.info())
            info["load_s"] = round(time.monotonic() - t0, 3)
            if os.environ.get("TERRASCOPE_WARMUP", "1") != "0" and hasattr(self.model, "warm_up"):
                # compile kernels and capture graphs now, so no user's first answer waits for them
                try:
                    info["warmup_s"] = round(float(self.model.warm_up()), 3)
                    if info["warmup_s"]:
                        log.info("warm-up (kernel compile, graph capture) in %.1f s", info["warmup_s"])
                except Exception as exc:  # noqa: BLE001 - a failed warm-up costs speed, not the model
                    log.warning("warm-up failed (the first answer will pay the set-up): %s: %s",
                                type(exc).__name__, exc)
            self._model_info = P.json_safe(info)
            self.state = "ready"
            log.info("model ready in %.1f s: %s", time.monotonic() - t0, info.get("name"))
        except Exception as exc:  # noqa: BLE001 - any load failure is reported, not raised
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            self._model_info = {"name": self.config.model_label or "?", "state": "failed", "error": self.load_error}
            log.error("model failed to load: %s", self.load_error)
            log.debug("%s", traceback.format_exc())

    def _emit(self, push: zmq.Socket, job: Job, header: dict, arrays: dict | None = None) -> None:
        frames = P.encode_message(header, arrays)
        terminal = b"1" if header.get("event") in ("done", "error") else b"0"
        push.send_multipart([job.token, terminal] + frames, copy=False)

    def _run_job(self, job: Job, push: zmq.Socket) -> None:
        from worker.measure import RasterError

        req = job.request
        try:
            if self.state != "ready":
                raise P.ProtocolError(P.MODEL_UNAVAILABLE, f"the model is not available: {self.load_error}", req.id)
            if self._answer_windowed(job, push):
                return
            result, steps_out, prep_ms, resolve_in = self._answer(job, push)
            if result.stopped == "cancelled" or job.cancel.is_set():
                self._emit(push, job, P.error_event(req.id, P.CANCELLED, "the request was cancelled"))
                return
            from worker.checks import answer_checks
            from worker.resolve import choice_check

            measured = self._measured_choice(req, resolve_in)
            checks = answer_checks(result.answer, steps_out)
            checks += [c for c in [choice_check(result.choice, measured, req.options)] if c]

            timings = {"queue": (job.started - job.received) * 1000, "prepare": prep_ms}
            timings.update({k: float(v) for k, v in (result.timings_ms or {}).items()})
            timings["total"] = (time.monotonic() - job.received) * 1000
            done = P.event(
                "done",
                req.id,
                answer=result.answer,
                choice=result.choice,
                reasoning=result.reasoning,
                text=result.text,
                stopped=result.stopped,
                measurements=steps_out,
                measured_choice=measured,
                checks=checks,
                timings_ms={k: round(v, 3) for k, v in timings.items()},
                model={k: self._model_info.get(k) for k in ("name", "preset", "device", "dtype")},
                worker={"pid": os.getpid()},
            )
            self._emit(push, job, done)
            self.stats["answered"] += 1
        except P.ProtocolError as exc:
            self._emit(push, job, P.error_event(req.id, exc.code, exc.message))
        except RasterError as exc:
            self._emit(push, job, P.error_event(req.id, P.BAD_RASTER, exc.message, reason=exc.code))
        except Exception as exc:  # noqa: BLE001 - the worker must survive any one request
            if _is_oom(exc):
                msg = f"out of memory while answering ({exc}); memory was released, try a smaller region"
                # the traceback's frames hold the job's tensors and arrays: drop them before releasing
                traceback.clear_frames(exc.__traceback__)
                exc.__traceback__ = None
                _release_memory()
                self._emit(push, job, P.error_event(req.id, P.OOM, msg))
            else:
                log.error("request %s failed:\n%s", req.id, traceback.format_exc())
                self._emit(push, job, P.error_event(req.id, P.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"))

    def _answer_windowed(self, job: Job, push: zmq.Socket) -> bool:
        """Sliding-window mode (worker/windows.py); False when the request is answered in one view."""
        from worker.windows import WindowedRun, plan_windows

        req = job.request
        t0 = time.monotonic()
        plan = plan_windows(req, self.config.windows)
        if plan is None:
            return False
        plan_ms = (time.monotonic() - t0) * 1000
        run = WindowedRun(self.model, req, plan, self.config.max_side,
                          lambda header, arrays: self._emit(push, job, header, arrays), self._stopper(job))
        fields = run.run()
        if fields["stopped"] == "cancelled" or job.cancel.is_set():
            self._emit(push, job, P.error_event(req.id, P.CANCELLED, "the request was cancelled"))
            return True
        timings = {"queue": (job.started - job.received) * 1000, "plan": plan_ms}
        timings.update(fields.pop("timings_ms"))
        timings["total"] = (time.monotonic() - job.received) * 1000
        # the windows' letters are not combined; the stitched masks, measured once, still support an option
        done = P.event("done", req.id, **fields, measured_choice=self._measured_choice(req, run.resolve_input()),
                       timings_ms={k: round(v, 3) for k, v in timings.items()},
                       model={k: self._model_info.get(k) for k in ("name", "preset", "device", "dtype")},
                       worker={"pid": os.getpid()})
        self._emit(push, job, done)
        self.stats["answered"] += 1
        return True

    def _measured_choice(self, req: Any, resolve_in: tuple[list, list]) -> dict | None:
        """The option the masks support (worker/resolve.py); a failure there never costs the answer."""
        from worker.resolve import measured_choice

        try:
            return measured_choice(req.question, req.options, *resolve_in)
        except Exception:  # noqa: BLE001
            log.error("request %s: measured choice failed:\n%s", req.id, traceback.format_exc())
            return None

    def _stopper(self, job: Job) -> Callable[[], bool]:
        """The job's ``should_stop``: cancel, shutdown, or (with a budget) its peak memory growth -> MemoryError.

        With a budget the peak is counted from here, on a trimmed heap: deterministic across jobs.
        """
        budget, rss0 = self.config.job_memory_budget, None
        if budget is not None:
            _trim()
            _start_peak_window()
            rss0 = _rss()

        def should_stop() -> bool:
            if budget is not None and rss0 is not None:
                grown = (_peak_rss() or rss0) - rss0
                if grown > budget:
                    raise MemoryError(f"the job's memory budget of {budget / 2**20:.0f} MiB was exceeded "
                                      f"(+{grown / 2**20:.0f} MiB)")
            return job.cancel.is_set() or self._stop.is_set()

        return should_stop

    def _prepare(self, req: V.AskRequest) -> list[Any]:
        from worker.raster import prepare_array, read_raster

        prepared = []
        for im in req.images:
            data, georef, nodata, names = im.data, im.georef, im.nodata, im.band_names
            if im.path is not None:
                data, georef, file_nodata, file_names = read_raster(str(im.path), max_side=self.config.max_side)
                nodata = nodata if nodata is not None else file_nodata
                names = names or file_names
            prepared.append(
                prepare_array(
                    data,
                    georef,
                    nodata=nodata,
                    band_names=names,
                    role="sar" if im.role == "sar" else "optical",
                    sensor=im.sensor,
                    max_side=self.config.max_side,
                )
            )
        return prepared

    def _answer(self, job: Job, push: zmq.Socket) -> tuple[AnswerResult, list[dict], float, tuple[list, list]]:
        """The model's result, the measured steps, the preparation time, and (steps, images) for resolve."""
        from worker.measure import RasterError, grounding_text, measure_mask, sieve
        from worker.raster import mask_to_request_grid
        from worker.resolve import MeasuredImage, MeasuredStep, span_with_answer

        req = job.request
        t0 = time.monotonic()
        should_stop = self._stopper(job)
        prepared = self._prepare(req)
        prep_ms = (time.monotonic() - t0) * 1000
        images = [ImageInput(pixels=p.pixels, role=im.role) for p, im in zip(prepared, req.images)]
        measured: dict[int, tuple[np.ndarray, dict]] = {}

        def measure(step: MaskStep) -> tuple[np.ndarray, dict]:
            if step.step not in measured:
                prep = prepared[step.image_index]
                valid = mask_to_request_grid(prep.valid, prep)
                # what is sent is what is measured: no mask pixel on nodata, no decoder speck (on the model grid)
                model_mask = sieve(step.mask) if req.sieve else step.mask
                mask = mask_to_request_grid(model_mask, prep) & valid
                try:
                    m = measure_mask(mask, prep.georef, valid)
                    measured[step.step] = (mask, m.to_dict() | {"grounding": grounding_text(m)})
                except RasterError as exc:
                    measured[step.step] = (mask, {"note": f"measurement unavailable: {exc.message}"})
            return measured[step.step]

        resolve_images = [MeasuredImage(im.role, p.georef, mask_to_request_grid(p.valid, p))
                          for p, im in zip(prepared, req.images)]
        grounded: list[MeasuredStep] = []
        spans: dict[int, str | None] = {}

        def grounding(step: MaskStep) -> str | None:
            """The measurement span injected after this mask: its figures and, with options, the option the
            masks so far support (as the training spans carry it)."""
            if step.step not in spans:
                mask, meas = measure(step)
                span = meas.get("grounding")
                grounded.append(MeasuredStep(step.step, step.label, step.image_index, mask, meas))
                if span and req.options:
                    try:
                        span = span_with_answer(span, req.question, req.options, grounded, resolve_images)
                    except Exception:  # noqa: BLE001 -- a rule failure never costs the answer
                        log.error("request %s: measured answer in span failed:\n%s", req.id, traceback.format_exc())
                spans[step.step] = span
            return spans[step.step]

        def on_token(text: str) -> None:
            # injected visual tokens show as <REGION> placeholders: part of `text`, not of the stream
            text = text.replace("<REGION>", "")
            if text:
                self._emit(push, job, P.event("token", req.id, text=text))

        def on_mask(step: MaskStep) -> None:
            mask, meas = measure(step)
            prep = prepared[step.image_index]
            ev = P.event(
                "mask",
                req.id,
                step=step.step,
                label=step.label,
                image=step.image_index,
                score=float(step.score),
                measurements=meas,
                # the model may call on_mask before grounding(); the span is ours either way
                grounding_text=step.grounding_text or (grounding(step) if req.measure_grounding else None),
                grid={"geotransform": list(prep.georef.to_gdal()), "crs_wkt": prep.georef.crs_wkt,
                      "shape": list(mask.shape)},
                token_indices=[int(i) for i in step.token_indices],
                modality=list(step.modality),
                region_rule=step.region_rule,
            )
            self._emit(push, job, ev, {"mask": mask.view(np.uint8)})

        assert self.model is not None
        extra = {"forced_prefix": req.forced_prefix} if req.forced_prefix else {}
        result = self.model.answer(
            images,
            req.question,
            req.options,
            settings=req.settings,
            on_token=on_token,
            on_mask=on_mask,
            grounding=grounding if req.measure_grounding else None,
            should_stop=should_stop,
            **extra,
        )
        steps_out, resolve_steps = [], []
        for step in result.steps:
            mask, meas = measure(step)
            steps_out.append(
                {"step": step.step, "label": step.label, "image": step.image_index, "score": float(step.score),
                 "region_rule": step.region_rule} | meas
            )
            resolve_steps.append(MeasuredStep(step.step, step.label, step.image_index, mask, meas))
        return result, steps_out, prep_ms, (resolve_steps, resolve_images)

    # --- IO thread ----------------------------------------------------------------------------
    def _make_router(self) -> zmq.Socket:
        cfg = self.config
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.LINGER, 1000)
        # libzmq drops a frame above the limit before allocating it (and the connection with it);
        # whole-message sums are checked in decode_message and answered with "too_large".
        s.setsockopt(zmq.MAXMSGSIZE, cfg.limits.max_message_bytes)
        s.setsockopt(zmq.RCVHWM, 256)
        s.setsockopt(zmq.SNDHWM, 10000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if cfg.curve_secret is not None:
            self._start_auth()
            s.curve_server = True
            s.curve_secretkey = cfg.curve_secret
            s.curve_publickey = zmq.curve_public(cfg.curve_secret)
        if cfg.bind:
            s.bind(cfg.endpoint)
            self.endpoint = s.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            s.connect(cfg.endpoint)
            self.endpoint = cfg.endpoint
        return s

    def _start_auth(self) -> None:
        self._auth = start_authenticator(self._ctx, self.config.client_keys)

    def _io_main(self) -> None:
        try:
            router = self._make_router()
            pull = self._ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(self._events_ep)
            bus_pub = bus_sub = None
            if self.config.bus_pub and self.config.bus_sub:
                bus_pub = self._ctx.socket(zmq.PUB)
                bus_pub.setsockopt(zmq.LINGER, 500)
                bus_pub.connect(self.config.bus_pub)
                bus_sub = self._ctx.socket(zmq.SUB)
                bus_sub.setsockopt(zmq.LINGER, 0)
                bus_sub.setsockopt(zmq.SUBSCRIBE, b"")
                bus_sub.connect(self.config.bus_sub)
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self._bind_error = exc
            self._bound.set()
            self._done.set()
            return
        self._router, self._bus_pub = router, bus_pub
        self._bound.set()
        log.info("worker listening on %s (pid %d)", self.endpoint, os.getpid())
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        if bus_sub is not None:
            poller.register(bus_sub, zmq.POLLIN)
        self._next_beat = time.monotonic() + self.config.heartbeat_s
        self._shutdown_deadline: float | None = None
        try:
            while True:
                try:
                    if self._io_step(poller, router, pull, bus_sub):
                        break
                except zmq.ContextTerminated:
                    break
                except Exception:  # noqa: BLE001 - a bug in one step must not end the service
                    log.error("IO loop step failed (the worker keeps serving):\n%s", traceback.format_exc())
                    time.sleep(0.01)
        finally:
            self._queue.close()
            for job in list(self._by_token.values()):
                job.cancel.set()
            self._model_thread.join(5.0)
            pull.close(0)
            router.close(1000)
            for s in (bus_pub, bus_sub):
                if s is not None:
                    s.close()
            if self._auth is not None:
                self._auth.stop()
            self._done.set()
            log.info("worker stopped")

    def _io_step(self, poller: zmq.Poller, router: zmq.Socket, pull: zmq.Socket, bus_sub: zmq.Socket | None) -> bool:
        """One poll round of the IO thread; True when the service is done."""
        ready = dict(poller.poll(100))
        if pull in ready:
            self._drain_events(pull)
        if router in ready:
            for _ in range(64):  # bounded batch so events and beats are never starved
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._on_message(frames)
                except Exception:  # noqa: BLE001 - even the error reply failed: drop this message
                    log.error("could not answer a message:\n%s", traceback.format_exc())
        if bus_sub is not None and bus_sub in ready:
            self._drain_bus(bus_sub)
        now = time.monotonic()
        self._flush_pending(now)
        if now >= self._next_beat:
            self._beat(now)
            self._next_beat = now + self.config.heartbeat_s
        if self._stop.is_set() and not self._shutting_down:
            self._begin_shutdown(broadcast=False)
        if self._shutting_down:
            if self._shutdown_deadline is None:
                self._shutdown_deadline = now + 10.0
            if (not self._model_thread.is_alive() and not self._by_token) or now > self._shutdown_deadline:
                self._drain_events(pull)
                return True
        return False

    # --- sending ------------------------------------------------------------------------------
    def _send(self, envelope: Sequence[Any], frames: Sequence[Any], job: Job | None = None) -> None:
        """Sends to a client; a vanished client cancels its job, a slow one is buffered."""
        client = bytes(envelope[-1]) if envelope else b""
        queue = self._pending.get(client)
        if queue:
            queue.append((list(envelope), list(frames), job))
            return
        try:
            self._router.send_multipart(list(envelope) + [b""] + list(frames), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._pending.setdefault(client, collections.deque()).append((list(envelope), list(frames), job))
            self._pending_since.setdefault(client, time.monotonic())
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._client_gone(client, "disconnected")
            else:
                raise

    def _flush_pending(self, now: float) -> None:
        for client in list(self._pending):
            queue = self._pending[client]
            while queue:
                envelope, frames, _job = queue[0]
                try:
                    self._router.send_multipart(envelope + [b""] + frames, flags=zmq.NOBLOCK, copy=False)
                    queue.popleft()
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    queue.clear()
                    self._client_gone(client, "disconnected")
            if not queue:
                self._pending.pop(client, None)
                self._pending_since.pop(client, None)
            elif now - self._pending_since.get(client, now) > 30.0:
                self._pending.pop(client, None)
                self._pending_since.pop(client, None)
                self._client_gone(client, "not reading its events for 30 s")

    def _client_gone(self, client: bytes, why: str) -> None:
        for job in [j for j in self._by_token.values() if j.client == client]:
            log.info("client of request %s %s: cancelling it", job.request.id, why)
            self._cancel_job(job, notify=False)

    def _reply(self, envelope: Sequence[Any], header: dict, arrays: dict | None = None) -> None:
        self._send(envelope, P.encode_message(header, arrays))

    def _error(self, envelope: Sequence[Any], rid: str | None, code: str, message: str, **extra: Any) -> None:
        self.stats["errors"] += 1
        self._reply(envelope, P.error_event(rid, code, message, **extra))

    # --- receiving ----------------------------------------------------------------------------
    def _on_message(self, frames: list[zmq.Frame]) -> None:
        hops = self.config.hops
        self.stats["received"] += 1
        if len(frames) <= hops:
            return  # not even a full routing envelope: nothing to answer to
        envelope = [f.bytes for f in frames[:hops]]
        if len(frames[hops].buffer) != 0:
            self._error(envelope, None, P.BAD_FRAME, "expected an empty delimiter frame before the header")
            return
        rid = None
        try:
            header, arrays = P.decode_message(frames[hops + 1 :], self.config.limits)
            rid = V.request_id(header)
            op = header.get("op")
            if "op" not in header:
                raise P.ProtocolError(P.MISSING_FIELD, "request has no 'op'", rid)
            if op == "ping":
                self._on_ping(envelope, header, rid)
            elif op == "info":
                self._reply(envelope, self._info_event(rid))
            elif op == "ask":
                self._on_ask(envelope, header, arrays, rid)
            elif op == "cancel":
                self._on_cancel(envelope, header, rid)
            elif op == "echo":
                self._reply(envelope, P.event("echo", rid), arrays)
            elif op == "shutdown":
                self._reply(envelope, P.event("bye", rid, pid=os.getpid()))
                self._begin_shutdown(broadcast=True)
            else:
                shown = op if isinstance(op, str) and len(op) < 40 else type(op).__name__
                raise P.ProtocolError(P.UNKNOWN_OP, f"unknown op {shown!r}; known: {', '.join(P.OPS)}", rid)
        except P.ProtocolError as exc:
            self._error(envelope, exc.request_id or rid, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - never let one message stop the loop
            log.error("message handling failed:\n%s", traceback.format_exc())
            self._error(envelope, rid, P.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _on_ping(self, envelope: list[bytes], header: dict, rid: str) -> None:
        active = header.get("active")
        client = envelope[-1]
        ids = [a for a in active if isinstance(a, str)][:64] if isinstance(active, list) else []
        if ids:
            self._keepalive(client, ids)
            self._publish({"kind": "keepalive", "client": client.hex(), "ids": ids})
        running = [j.request.id for j in self._by_token.values() if j.state == "running"]
        self._reply(
            envelope,
            P.event(
                "pong",
                rid,
                state=self.state,
                queue_length=len(self._queue),
                max_queue=self.config.max_queue,
                running=len(running),
                pid=os.getpid(),
                time=time.time(),
            ),
        )

    def _keepalive(self, client: bytes, ids: Sequence[str]) -> None:
        now = time.monotonic()
        with self._lock:  # the model thread may have stamped a later start meanwhile: keep the max
            for rid in ids:
                job = self._jobs.get((client, rid))
                if job is not None:
                    job.last_client_seen = max(job.last_client_seen, now)

    def _on_ask(self, envelope: list[bytes], header: dict, arrays: dict, rid: str) -> None:
        if self._shutting_down:
            raise P.ProtocolError(P.SHUTTING_DOWN, "the worker is shutting down", rid)
        req = V.validate_ask(header, arrays, self.config.limits, self.config.allow_paths)
        if self.state == "failed":
            raise P.ProtocolError(P.MODEL_UNAVAILABLE, f"the model failed to load: {self.load_error}", rid)
        client = envelope[-1]
        if (client, rid) in self._jobs:
            raise P.ProtocolError(P.BAD_FIELD, f"request id {rid!r} is already in progress", rid)
        now = time.monotonic()
        job = Job(token=os.urandom(8), client=client, envelope=envelope, request=req, received=now,
                  last_client_seen=now)
        self._jobs[job.key] = job
        self._by_token[job.token] = job
        position = self._queue.put(job)
        if position == 0:
            self._forget(job)
            raise P.ProtocolError(
                P.BUSY, f"the worker's queue is full ({self.config.max_queue} waiting); retry shortly", rid
            )
        self._send(envelope, P.encode_message(P.event("accepted", rid, position=position, state=self.state)), job)

    def _on_cancel(self, envelope: list[bytes], header: dict, rid: str) -> None:
        target = header.get("target")
        if not isinstance(target, str):
            raise P.ProtocolError(P.MISSING_FIELD, "cancel needs 'target' (the id of the request to cancel)", rid)
        client = envelope[-1]
        job = self._jobs.get((client, target))
        found = job is not None
        if job is not None:
            self._cancel_job(job, notify=True)
        else:
            self._publish({"kind": "cancel", "client": client.hex(), "ids": [target]})
        self._reply(envelope, P.event("ack", rid, target=target, found=found if self.config.pool_size == 1 else None))

    def _cancel_job(self, job: Job, notify: bool) -> None:
        """Queued: removed and answered now. Running: stops at the next decode step."""
        with self._lock:
            queued = job.state == "queued"
            if queued:
                job.state = "finished"
        job.cancel.set()
        if queued:
            self._queue.remove(job)
            if notify:
                self._send(job.envelope, P.encode_message(P.error_event(job.request.id, P.CANCELLED, "cancelled")))
            self._forget(job)

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.key, None)
        self._by_token.pop(job.token, None)

    def _drain_events(self, pull: zmq.Socket) -> None:
        for _ in range(256):
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            job = self._by_token.get(frames[0].bytes)
            if job is None:
                continue
            terminal = frames[1].bytes == b"1"
            self._send(job.envelope, frames[2:], job)
            if terminal:
                with self._lock:
                    job.state = "finished"
                self._forget(job)

    def _beat(self, now: float) -> None:
        """Per-job ``alive`` events; cancels running jobs whose client stopped pinging.

        A queued job is never judged: clients ping only once they have seen their job running (an
        ``alive`` with state ``running`` - sent by the model thread at the start, and by every beat -
        or a token/mask). The model thread restarts ``last_client_seen`` at the start, so the window
        max(3 hb, 3 s) counts from there. Worst case: the client learns "running" from the next beat,
        at most ``config.heartbeat_s`` (1 s) after the start (normally at once), and pings ``hb``
        later: 1 s + hb < max(3 hb, 3 s) for every hb > 0. A dead client of a queued job is still
        caught when an ``alive`` cannot be routed to it (ROUTER_MANDATORY), else within the window
        once its job runs.
        """
        for job in list(self._by_token.values()):
            hb = job.request.client_heartbeat_s
            with self._lock:  # state and last_client_seen change together on the model thread
                state, seen = job.state, job.last_client_seen
            if state != "queued" and hb is not None and now - seen > max(3 * hb, 3.0):
                log.info("client of request %s stopped pinging: cancelling it", job.request.id)
                self._cancel_job(job, notify=False)
                continue
            position = self._queue.position(job) if state == "queued" else 0
            self._send(job.envelope, P.encode_message(P.event("alive", job.request.id, state=state,
                                                              position=position)), job)

    def _begin_shutdown(self, broadcast: bool) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        log.info("shutting down")
        if broadcast:
            self._publish({"kind": "shutdown"})
        self._stop.set()
        for job in list(self._by_token.values()):
            self._cancel_job(job, notify=True)
        self._queue.close()

    # --- pool control bus ---------------------------------------------------------------------
    def _publish(self, msg: dict) -> None:
        if self._bus_pub is not None:
            self._bus_pub.send(json.dumps(msg).encode())

    def _drain_bus(self, sub: zmq.Socket) -> None:
        for _ in range(256):
            try:
                raw = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = json.loads(raw)
                kind = msg.get("kind")
                if kind == "shutdown":
                    self._begin_shutdown(broadcast=False)
                    continue
                client = bytes.fromhex(msg["client"])
                ids = [i for i in msg.get("ids", []) if isinstance(i, str)]
                if kind == "keepalive":
                    self._keepalive(client, ids)
                elif kind == "cancel":
                    for rid in ids:
                        job = self._jobs.get((client, rid))
                        if job is not None:
                            self._cancel_job(job, notify=True)
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("ignoring a malformed control-bus message")

    # --- info ---------------------------------------------------------------------------------
    def _info_event(self, rid: str) -> dict:
        return P.event(
            "info",
            rid,
            state=self.state,
            error=self.load_error,
            model=self._model_info,
            device=self._model_info.get("device"),
            gpu=gpu_info() if self.state == "ready" else None,  # torch may be half-imported while loading
            versions=versions(complete=self.state != "loading"),
            limits=self.config.limits.to_dict() | {"max_queue": self.config.max_queue,
                                                    "max_side": self.config.max_side}
            | self.config.windows.to_dict(),
            protocol_version=P.PROTOCOL_VERSION,
            pid=os.getpid(),
            pool_size=self.config.pool_size,
            curve=self.config.curve_secret is not None or self.config.curve_in_front,
            stats=dict(self.stats),
        )


def start_authenticator(ctx: zmq.Context, client_keys: Sequence[bytes] | None) -> Any:
    """ZAP handler for CURVE: any client holding the server's public key, or only ``client_keys``."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx, log=logging.getLogger("terrascope.auth"))
    auth.start()
    if client_keys is None:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    else:
        allowed = {bytes(k) for k in client_keys}

        class _Keys:
            def callback(self, domain: str, key: bytes) -> bool:
                return bytes(key) in allowed

        auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
    return auth


def gpu_info() -> dict | None:
    """Name and memory of the visible CUDA device, if torch is loaded and sees one."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:  # torch may still be half-imported by the model thread
        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return {
            "name": torch.cuda.get_device_name(),
            "memory_total_bytes": int(total),
            "memory_free_bytes": int(free),
            "memory_allocated_bytes": int(torch.cuda.memory_allocated()),
            "count": torch.cuda.device_count(),
        }
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc)}


def versions(complete: bool = True) -> dict:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "numpy": np.__version__, "pyzmq": zmq.__version__,
           "libzmq": zmq.zmq_version()}
    for mod in ("torch", "transformers") if complete else ():
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    try:
        out["terrascope"] = metadata.version("terrascope-qgis")
    except metadata.PackageNotFoundError:
        pass
    return out
