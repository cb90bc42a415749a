"""``terrascope``: serve the model, ask it about rasters, measure masks, manage keys.

Errors exit non-zero with one line on stderr (a traceback only with ``--debug``):
1 = the request failed (the worker's error code is printed), 2 = bad usage or input,
3 = no worker reachable, 130 = interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError, WorkerUnavailable, read_key

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "resources" / "models"
DEFAULT_MODEL = "terrascope-mini"
EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 1, 2, 3, 130


class CliError(Exception):
    """A problem to report as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# --- model resolution ---------------------------------------------------------------------------
def resolve_model(spec: str | None) -> str:
    """A checkpoint folder, or a preset name the model package knows. Fails early with a clear line."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if "/" in spec or os.sep in spec or spec.startswith("."):
        raise CliError(f"model folder {spec} does not exist")
    embedded = MODELS_DIR / spec
    if embedded.is_dir():
        return str(embedded)
    if spec == DEFAULT_MODEL:
        raise CliError(
            f"embedded model {DEFAULT_MODEL} not found at {embedded} (it is produced by `make train-mini`); "
            "pass --model DIR"
        )
    return spec  # another preset (e.g. a random-weights shape for benchmarks): model.api decides


def model_loader(spec: str, device: str, dtype: str | None) -> Any:
    def load() -> Any:
        try:
            from model.api import TerraScope
        except ImportError as exc:
            raise RuntimeError(f"the model package is not available ({exc})") from None
        return TerraScope.load(spec, device=device, dtype=dtype)

    return load


# --- worker -------------------------------------------------------------------------------------
def _curve_options(args: argparse.Namespace) -> tuple[bytes | None, list[bytes] | None]:
    secret = read_key(args.curve_secret) if args.curve_secret else None
    clients = [read_key(k) for k in args.client_key] if args.client_key else None
    if clients and secret is None:
        raise CliError("--client-key needs --curve-secret (the server's key pair)")
    return secret, clients  # type: ignore[return-value]


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.service import ServiceConfig, WorkerService, is_loopback

    secret, clients = _curve_options(args)
    if secret is None and not args.pool_member and not is_loopback(args.endpoint):
        raise CliError(
            f"refusing to serve {args.endpoint} without authentication: a non-loopback address needs CURVE keys "
            "(`terrascope keys DIR`, then --curve-secret DIR/server.secret [--client-key DIR/client.public])"
        )
    model = resolve_model(args.model)
    limits = P.Limits(max_message_bytes=args.max_message_bytes)
    if args.gpus or args.workers > 1:
        return _run_pool(args, model, secret, clients)
    if args.pool_member:
        from worker.pool import pin_member

        pin_member(args.device.startswith("cuda"))  # before the service starts its threads, so they inherit it
    config = ServiceConfig(
        endpoint=args.endpoint,
        bind=not args.pool_member,
        hops=2 if args.pool_member else 1,
        max_queue=args.max_queue,
        limits=limits,
        allow_paths=[Path(p) for p in args.allow_path],
        curve_secret=None if args.pool_member else secret,
        client_keys=clients,
        max_side=args.max_side,
        bus_pub=args.bus_pub,
        bus_sub=args.bus_sub,
        pool_size=args.pool_size,
        curve_in_front=args.pool_curve,
        model_label=model,
        job_memory_budget=args.job_memory_budget_bytes,
        windows=window_defaults(args),
    )
    _apply_memory_limit(args.memory_limit_bytes)
    service = WorkerService(config, model_loader(model, args.device, args.dtype))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    try:
        endpoint = service.start()
    except zmq_error_types() as exc:
        raise CliError(f"cannot listen on {args.endpoint}: {exc}") from None
    if not args.pool_member:
        print(f"TerraScope worker on {endpoint} (model {model}, device {args.device}); Ctrl-C stops it",
              file=sys.stderr, flush=True)
    while not service.wait(0.5):
        pass
    return 0


def window_defaults(args: argparse.Namespace) -> Any:
    """The worker's sliding-window defaults from its flags, checked here so a typo fails at start."""
    from worker.windows import MAX_TILE, MIN_TILE, WindowDefaults

    d = WindowDefaults()
    tile = d.tile if args.window_size is None else args.window_size
    overlap = args.window_overlap
    if overlap is None:
        overlap = d.overlap if args.window_size is None else tile // 8
    threshold = d.threshold if args.window_threshold is None else args.window_threshold
    most = d.max_windows if args.max_windows is None else args.max_windows
    if not MIN_TILE <= tile <= MAX_TILE:
        raise CliError(f"--window-size must be between {MIN_TILE} and {MAX_TILE} px")
    if not 0 <= overlap < tile:
        raise CliError("--window-overlap must be >= 0 and smaller than --window-size")
    if threshold < 1 or most < 1:
        raise CliError("--window-threshold and --max-windows must be positive")
    return WindowDefaults(threshold=threshold, tile=tile, overlap=overlap, max_windows=most)


def zmq_error_types() -> tuple[type[BaseException], ...]:
    import zmq

    return (zmq.ZMQError, ValueError)


def _apply_memory_limit(limit: int | None) -> None:
    """Caps the address space so an oversized job fails with MemoryError (-> ``oom``), not the OOM killer."""
    if not limit:
        return
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _run_pool(args: argparse.Namespace, model: str, secret: bytes | None, clients: list[bytes] | None) -> int:
    from worker.pool import Pool, visible_gpus

    try:
        gpus: list[str | None] = list(visible_gpus(args.gpus)) if args.gpus else [None]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    per_gpu = max(1, args.workers) if args.gpus else args.workers
    slots = [g for g in gpus for _ in range(per_gpu)]
    device = "cuda" if args.gpus else args.device
    wd = window_defaults(args)  # fail here, not in every member
    member = ["--model", model, "--device", device, "--max-queue", str(args.max_queue),
              "--max-message-bytes", str(args.max_message_bytes), "--max-side", str(args.max_side),
              "--window-threshold", str(wd.threshold), "--window-size", str(wd.tile),
              "--window-overlap", str(wd.overlap), "--max-windows", str(wd.max_windows)]
    if args.dtype:
        member += ["--dtype", args.dtype]
    if args.memory_limit_bytes:
        member += ["--memory-limit-bytes", str(args.memory_limit_bytes)]
    if args.job_memory_budget_bytes:
        member += ["--job-memory-budget-bytes", str(args.job_memory_budget_bytes)]
    if secret is not None:
        member.append("--pool-curve")
    for p in args.allow_path:
        member += ["--allow-path", p]
    if args.debug:
        member.insert(0, "--debug")
    pool = Pool(args.endpoint, member, slots, curve_secret=secret, client_keys=clients,
                max_message_bytes=args.max_message_bytes)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: pool.stop())
    print(f"TerraScope worker pool: {len(slots)} workers on {args.endpoint}", file=sys.stderr, flush=True)
    return pool.run()


# --- clients ------------------------------------------------------------------------------------
def _client(args: argparse.Namespace, endpoint: str | None = None) -> WorkerClient:
    keys = None
    if args.client_key:
        if not args.client_secret:
            raise CliError("--client-key needs --client-secret")
        keys = (args.client_key, args.client_secret)
    return WorkerClient(endpoint or args.endpoint, timeout_s=args.timeout, curve_server_key=args.server_key,
                        curve_client_keys=keys)


def cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ev = c.ping()
    if args.json:
        print(json.dumps(ev))
    else:
        print(f"worker pid {ev['pid']} is {ev['state']}: {ev['running']} running, "
              f"{ev['queue_length']}/{ev['max_queue']} queued")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ev = c.info()
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    model = ev.get("model") or {}
    gpu = ev.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_total_bytes'] / 2**30:.1f} GiB)" if gpu and "name" in gpu else "none"
    lines = [
        f"state:    {ev.get('state')}" + (f" ({ev['error']})" if ev.get("error") else ""),
        f"model:    {model.get('name')} preset={model.get('preset')} dtype={model.get('dtype')}",
        f"device:   {ev.get('device')}   GPU: {gpu_text}",
        f"protocol: {ev.get('protocol_version')}   pool: {ev.get('pool_size')}   CURVE: {ev.get('curve')}",
        f"limits:   {json.dumps(ev.get('limits'))}",
        f"versions: {json.dumps(ev.get('versions'))}",
    ]
    print("\n".join(lines))
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.shutdown()
    print("worker is shutting down", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import zmq

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    names = ["server.public", "server.secret", "client.public", "client.secret"]
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise CliError(f"{folder} already holds {', '.join(existing)}; refusing to overwrite keys")
    for role in ("server", "client"):
        public, secret = zmq.curve_keypair()
        for kind, key in (("public", public), ("secret", secret)):
            path = folder / f"{role}.{kind}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key + b"\n")
    print(f"wrote {', '.join(str(folder / n) for n in names)} (mode 0600)")
    print(f"worker: terrascope worker --endpoint tcp://0.0.0.0:5557 --curve-secret {folder}/server.secret "
          f"--client-key {folder}/client.public")
    print(f"client: --server-key {folder}/server.public --client-key {folder}/client.public "
          f"--client-secret {folder}/client.secret")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from worker.measure import RasterError, measure_file

    try:
        m = measure_file(args.mask, value=args.value)
    except RasterError as exc:
        raise CliError(f"{args.mask}: {exc.message}") from None
    d = m.to_dict()
    if args.json:
        print(json.dumps(P.json_safe(d)))
        return 0
    if m.area_ha is not None:
        print(f"area:       {m.area_ha:.4f} ha ({m.area_m2:.1f} m²)")
        print(f"perimeter:  {m.perimeter_m:.1f} m")
    else:
        print(f"area:       {m.area_px} px (no ha: {m.note})")
    print(f"coverage:   {m.coverage_pct:.2f} % of valid pixels")
    print(f"objects:    {m.count}")
    if m.note and m.area_ha is not None:
        print(f"note:       {m.note}")
    return 0


#: Subcommands whose arguments belong to another module's own parser (``terrascope bench ...``).
PASSTHROUGH = {"bench": "model.bench.cli", "train": "model.train"}


def cmd_passthrough(command: str, rest: list[str]) -> int:
    import importlib

    try:
        entry = importlib.import_module(PASSTHROUGH[command]).main
    except ImportError as exc:
        raise CliError(f"'terrascope {command}' is not available in this install ({exc})") from None
    return int(entry(rest) or 0)


def cmd_ask(args: argparse.Namespace) -> int:
    from worker.ask import run_ask

    return run_ask(args)


# --- parser -------------------------------------------------------------------------------------
def _add_client_opts(p: argparse.ArgumentParser, endpoint_default: str | None = P.DEFAULT_ENDPOINT) -> None:
    p.add_argument("--endpoint", default=endpoint_default, help="worker endpoint (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds without an answer before giving up")
    p.add_argument("--server-key", help="the worker's CURVE public key (file or z85) for a remote worker")
    p.add_argument("--client-key", help="this client's CURVE public key (file or z85)")
    p.add_argument("--client-secret", help="this client's CURVE secret key (file or z85)")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terrascope", description="TerraScope for QGIS: worker and command line")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="serve the model over ZeroMQ")
    w.add_argument("--endpoint", default=P.DEFAULT_ENDPOINT)
    w.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or preset (default %(default)s)")
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    w.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    w.add_argument("--gpus", help="'all' or '0,1': one worker process per GPU behind one endpoint")
    w.add_argument("--workers", type=int, default=1, help="worker processes (per GPU with --gpus)")
    w.add_argument("--max-queue", type=int, default=8, help="jobs waiting per worker before 'busy'")
    w.add_argument("--max-message-bytes", type=int, default=P.Limits().max_message_bytes)
    w.add_argument("--max-side", type=int, default=2048, help="longest side of the model's view of a raster")
    # defaults live in worker.windows.WindowDefaults (not imported here: it would slow every command's start)
    w.add_argument("--window-threshold", type=int, default=None, metavar="PX",
                   help="sliding windows (mode auto) when a request grid's longer side exceeds this (default 4096)")
    w.add_argument("--window-size", type=int, default=None, metavar="PX",
                   help="default window side on the request grid (default 2048)")
    w.add_argument("--window-overlap", type=int, default=None, metavar="PX",
                   help="default overlap of neighbouring windows (default 256, or 1/8 of --window-size)")
    w.add_argument("--max-windows", type=int, default=None, help="most windows one request may need (default 100)")
    w.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="folder whose files clients may name by path (default: none)")
    w.add_argument("--curve-secret", help="server secret key file: enables CURVE (required off loopback)")
    w.add_argument("--client-key", action="append", default=[], metavar="FILE",
                   help="public key of an allowed client (repeatable; default: any holder of the server key)")
    w.add_argument("--memory-limit-bytes", type=int, default=None, help="address-space cap (tests of 'oom')")
    w.add_argument("--job-memory-budget-bytes", type=int, default=None,
                   help="RSS one request may add before it fails with 'oom' (checked each decode step)")
    for hidden in ("--bus-pub", "--bus-sub"):
        w.add_argument(hidden, help=argparse.SUPPRESS)
    w.add_argument("--pool-member", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--pool-size", type=int, default=1, help=argparse.SUPPRESS)
    w.add_argument("--pool-curve", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)

    a = sub.add_parser("ask", help="ask a question about one or more rasters")
    a.add_argument("images", nargs="+", metavar="IMAGE", help="raster(s); several = a time series t0, t1, ...")
    a.add_argument("-q", "--question", required=True)
    a.add_argument("--sar", help="a SAR raster paired with the optical IMAGE")
    a.add_argument("--option", action="append", default=[], help='multiple-choice option, e.g. "A. water"')
    a.add_argument("--model", default=DEFAULT_MODEL, help="in-process model (when no --endpoint)")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    a.add_argument("--max-new-tokens", type=int, default=512)
    a.add_argument("--max-side", type=int, default=2048, help="rasters are read decimated to this side")
    a.add_argument("--out", help="folder for the GeoPackage and mask GeoTIFFs")
    a.add_argument("--ground", dest="ground", action="store_true", default=False,
                   help="measurement grounding: feed each mask's measured area back into the reasoning")
    a.add_argument("--no-ground", dest="ground", action="store_false")
    a.add_argument("--forced-prefix", help="teacher-force the start of the reply (tests and demos)")
    a.add_argument("--windows", choices=["auto", "on", "off"], default=None,
                   help="sliding-window mode for very large rasters (default: the worker's, i.e. auto)")
    a.add_argument("--window-size", type=int, default=None, metavar="PX",
                   help="window side on the raster's own grid (default: the worker's, 2048)")
    a.add_argument("--window-overlap", type=int, default=None, metavar="PX",
                   help="overlap of neighbouring windows (default: the worker's, or 1/8 of --window-size)")
    _add_client_opts(a, endpoint_default=None)
    a.set_defaults(func=cmd_ask)

    m = sub.add_parser("measure", help="area, coverage, count and perimeter of a mask raster")
    m.add_argument("mask")
    m.add_argument("--value", type=int, default=None, help="pixel value that marks the mask (default: non-zero)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_measure)

    for name, func, text in (("ping", cmd_ping, "is a worker alive?"), ("info", cmd_info, "worker details"),
                             ("shutdown", cmd_shutdown, "stop a worker")):
        p = sub.add_parser(name, help=text)
        _add_client_opts(p)
        p.set_defaults(func=func)

    k = sub.add_parser("keys", help="create CURVE key pairs (server + client) as 0600 files")
    k.add_argument("dir")
    k.set_defaults(func=cmd_keys)

    sub.add_parser("bench", help="TerraScope-Bench: run a bench file through the worker path (see docs/BENCH.md)",
                   add_help=False)
    sub.add_parser("train", help="train or fine-tune from a config (see docs/TRAINING.md)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    passthrough = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if passthrough is not None and argv[passthrough] not in PASSTHROUGH:
        passthrough = None
    debug = "--debug" in (argv[:passthrough] if passthrough is not None else argv)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if passthrough is not None:
            return cmd_passthrough(argv[passthrough], argv[passthrough + 1 :])
        args = parser.parse_args(argv)
        if args.command == "worker" and args.debug:
            logging.getLogger("terrascope").setLevel(logging.DEBUG)
        elif args.command == "worker":
            logging.getLogger("terrascope").setLevel(logging.INFO)
        return int(args.func(args) or 0)
    except CliError as exc:
        return _fail(str(exc), exc.code, debug)
    except WorkerUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE, debug)
    except WorkerError as exc:
        return _fail(f"{exc.message} [{exc.code}]", EXIT_FAILED, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, debug)
    except (OSError, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE, debug)
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        return _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)", EXIT_FAILED, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    first = " ".join(message.split())
    print(f"terrascope: error: {first}", file=sys.stderr)
    return code


def private_endpoint() -> tuple[str, str | None]:
    """An endpoint only this process (user) can reach, and the temp folder to remove afterwards."""
    import zmq

    if zmq.has("ipc"):
        folder = tempfile.mkdtemp(prefix="terrascope-")
        return f"ipc://{folder}/worker.sock", folder
    return "tcp://127.0.0.1:*", None


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so worker.ask and we share CliError & co.
    from worker.cli import main as _main

    sys.exit(_main())
