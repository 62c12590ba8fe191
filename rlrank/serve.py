"""Command line: ``rlrank-serve`` -- the jobs API and the live dashboard (``pip install "rlrank[serve]"``).

Binds to 127.0.0.1 by default, keeps its job table, logs and token under ``RUNS/.service/``, and
prints the dashboard's link (with the token) and where the token is. One server per runs folder.
Bad input (a port in use, a runs folder another server holds, a missing extra) exits with code 2
and one line.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from rlrank.errors import UserError
from rlrank.options import EXIT_USAGE, OneLineParser

PROG = "rlrank-serve"
SERVICE_DIR = ".service"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Serve rlrank searches as jobs: submit, watch and fetch them over HTTP, and a live "
        "dashboard in the browser. Every request needs the server's bearer token.",
        epilog="examples:\n"
        "  rlrank-serve                                   # http://127.0.0.1:8321, jobs in ./runs\n"
        "  rlrank-serve --runs /data/runs --max-running 2 --allow-read /data/cifar10\n"
        "  rlrank-serve --ray-address auto                # every job a Ray task on a running cluster",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default: %(default)s)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=8321, help="port, 0 = any free one (default: %(default)s)")
    p.add_argument("--max-running", type=int, default=1, help="jobs running at once (default: %(default)s)")
    p.add_argument(
        "--max-jobs", type=int, default=100, help="jobs queued or running at most (default: %(default)s)"
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=64 * 1024, help="largest request body (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of each job; 0 = this machine's cores shared among --max-running (default)",
    )
    p.add_argument(
        "--allow-read",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder jobs may read data sets and checkpoints from, besides the runs folder (repeatable)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="run every job as a Ray task on this cluster ('local': a Ray started here; needs rlrank[ray])",
    )
    p.add_argument("--token-file", type=Path, default=None, help="token file (default: RUNS/.service/token)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return _serve(args)
    except ServeError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE


class ServeError(UserError):
    """The server cannot start (exit code 2)."""


def _serve(args: argparse.Namespace) -> int:
    for name in ("max_running", "max_jobs", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535 or args.threads < 0:
        raise ServeError("--port must be in 0..65535 and --threads at least 0")
    try:
        import uvicorn

        from rlrank.service.app import ServiceConfig, create_app
    except ImportError as exc:
        raise ServeError(f'rlrank-serve needs the serve extra: pip install "rlrank[serve]" ({exc})') from exc
    from rlrank.service.auth import load_token
    from rlrank.service.job_store import JobStore
    from rlrank.service.launchers import ProcessLauncher, RayLauncher
    from rlrank.service.scheduler import Scheduler
    from rlrank.threads import available_cpus

    for folder in args.allow_read:
        if not folder.is_dir():
            raise ServeError(f"--allow-read {folder}: no such folder")
    runs = args.runs.resolve()
    service = runs / SERVICE_DIR
    try:
        service.mkdir(parents=True, exist_ok=True)
        lock = open(service / "server.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held while serving
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise ServeError(f"another rlrank-serve serves {runs}") from exc
    except OSError as exc:
        raise ServeError(f"cannot use runs folder {runs}: {exc.strerror or exc}") from exc
    try:
        token = load_token(args.token_file or service / "token")
    except UserError as exc:
        raise ServeError(str(exc)) from exc
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    host, port = sock.getsockname()[:2]
    threads = args.threads or max(1, available_cpus() // args.max_running)
    if args.ray_address:
        try:
            launcher = RayLauncher(args.ray_address, threads)
        except ImportError as exc:
            raise ServeError('--ray-address needs Ray: pip install "rlrank[ray]"') from exc
        except Exception as exc:  # noqa: BLE001 - Ray's own errors: one line
            raise ServeError(f"cannot use Ray at {args.ray_address}: {exc}") from exc
    else:
        launcher = ProcessLauncher()
    store = JobStore(service / "jobs.sqlite")
    scheduler = Scheduler(store, launcher, service / "logs", args.max_running, threads)
    config = ServiceConfig(runs, token, list(args.allow_read), args.max_request_bytes, args.max_jobs)
    app = create_app(config, store, scheduler)
    url = f"http://{host}:{port}"
    (service / "address.json").write_text(
        json.dumps({"url": url, "pid": os.getpid()}) + "\n", encoding="utf-8"
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("listening on %s: anyone who can reach it and has the token can run jobs", args.host)
    print(f"{PROG}: serving {url} (jobs in {runs}, {args.max_running} at once, {threads} threads each)")  # noqa: T201
    print(f"{PROG}: dashboard {url}/?token={token}")  # noqa: T201
    print(f"{PROG}: token in {args.token_file or service / 'token'} (or $RLRANK_TOKEN)", flush=True)  # noqa: T201
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
