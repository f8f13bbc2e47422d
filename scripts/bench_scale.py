"""A study-sized folder through the whole portal (`make bench-scale`; not part of the tests).

    python scripts/bench_scale.py [--images 10000] [--chunk 50] [--max-minutes 38] [--out bench-out/scale.json]

Starts the portal with scripts/run_portal.py, exactly as `make run` does (its own redis-server,
Celery worker and gunicorn, on free ports), in a temporary instance folder with its own SQLite
database and storage, and waits for its ready banner. Builds a folder of `--images` images: the
HAM10000 200x150 images (../shared/data/ham10000-200x150/images, or BENCH_IMAGES=...) and, beyond
those, altered copies (a few pixels cropped, mirrored, brightened, written as JPEG or PNG) whose
normalised pixels differ, so that the portal's duplicate detection does not skip them. Sends the
folder as the browser does: one batch through the folder-upload API (POST /api/v1/batches with
`expected_files`), then its files in sequential chunks of `--chunk` files (at most 16 MB).

While it runs, threads sample the resident memory of the web and worker process trees (every
second) and the latency of the case list, a case page and the batch page (one after the other,
throughout). It waits for every image's prediction and Grad-CAM map (at most `--max-minutes`
after the first upload), then counts from the database what was analysed, failed, duplicated or
lost; SHAP explanations finished by then are counted, not waited for. Prints a table and writes
the summary to --out (also stdout's last line).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_pipeline import DEFAULT_IMAGES, Client, load_average, log, parse_utc, percentile  # noqa: E402
from run_portal import free_port  # noqa: E402

READY_LINES = ("Ready: the worker has loaded", "did not report warm")  # run_portal.print_banner
CHUNK_BYTES = 16 * 1024 * 1024  # static/batch.js: at most this many bytes per request
RSS_BASELINE_IMAGES = 1000  # worker RSS growth: after this many analysed images against the last


# --- the folder: shared images, then altered copies -------------------------------------------------


def altered_copy(source: Path, variant: int, folder: Path) -> Path:
    """Writes variant `variant` (1, 2, ...) of `source` into `folder`.

    Cropping `variant` pixels off the right and bottom edges gives each variant of an image its own
    size, so its normalised pixels (and content hash) differ from the original's and from every
    other variant's; mirroring and a brightness change make it look like another image to the
    model. Odd variants are written as PNG, even ones as JPEG, as a study folder mixes both."""
    from PIL import Image, ImageEnhance, ImageOps

    if variant < 1:
        raise ValueError(f"variant must be 1 or more, got {variant}")
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    if width <= variant or height <= variant:
        raise ValueError(f"{source.name} ({width}x{height}) is too small for variant {variant}")
    image = image.crop((0, 0, width - variant, height - variant))
    if variant % 2:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(1.0 + 0.03 * (1 if variant % 2 else -1) * ((variant + 1) // 2))
    suffix = "png" if variant % 2 else "jpg"
    path = folder / f"{source.stem}_v{variant}.{suffix}"
    if suffix == "png":
        image.save(path, format="PNG", compress_level=1)
    else:
        image.save(path, format="JPEG", quality=92)
    return path


def build_folder(sources: list[Path], count: int, folder: Path) -> list[Path]:
    """`count` image files: `sources` first, then altered copies of them (variant 1 of each, then 2...)."""
    if not sources:
        raise ValueError("no source images")
    paths = list(sources[:count])
    for index in range(len(paths), count):
        variant, source = divmod(index, len(sources))
        paths.append(altered_copy(sources[source], variant, folder))
    return paths


def chunks(paths: list[Path], per_request: int, max_bytes: int = CHUNK_BYTES) -> list[list[Path]]:
    """The browser's chunks (static/batch.js): at most `per_request` files and about `max_bytes`."""
    out: list[list[Path]] = []
    current: list[Path] = []
    size = 0
    for path in paths:
        length = path.stat().st_size
        if current and (len(current) >= per_request or size + length > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(path)
        size += length
    if current:
        out.append(current)
    return out


def p95(values: list[float]) -> float | None:
    """The 95th percentile (linear interpolation), None when nothing was measured."""
    return round(percentile(values, 95), 4) if values else None


# --- the portal, as `make run` starts it ------------------------------------------------------------


def portal_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.setdefault("PORTAL_ENV", "development")
    env.update(
        INSTANCE_DIR=str(folder / "instance"),
        DATABASE_URL=f"sqlite:///{folder / 'instance' / 'portal.db'}",
        STORAGE_DIR=str(folder / "storage"),
        REDIS_PORT=str(free_port()),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def make_account(env: dict[str, str]) -> tuple[str, str, str]:
    """A researcher with a password (for the pages) and an API token (for the upload)."""
    os.environ.update({k: env[k] for k in ("INSTANCE_DIR", "DATABASE_URL", "STORAGE_DIR", "PORTAL_ENV")})
    from webapp import create_app
    from webapp.bootstrap import upgrade_database
    from webapp.db import db
    from webapp.models import ApiToken, User

    app = create_app()
    upgrade_database(app)
    email, password = "bench-scale@localhost", os.urandom(16).hex()
    with app.app_context():
        user = User(email=email, role="researcher", active=True)
        user.set_password(password)
        db.session.add(user)
        db.session.commit()
        row, token = ApiToken.issue(user)
        db.session.add(row)
        db.session.commit()
    return email, password, token


def start_portal(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as out:  # the launcher and its children keep their own copy
        return subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "run_portal.py"), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_banner(proc: subprocess.Popen, log_path: Path, timeout: float = 1000) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        line = next((line for line in READY_LINES if line in text), None)
        if line:
            return line
        if proc.poll() is not None:
            raise RuntimeError(f"The portal exited ({proc.returncode}):\n{text[-4000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"No ready banner within {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}")


def stop_portal(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher, which stops web, worker and Redis itself."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def tree_rss(launcher_pid: int, marker: str) -> int:
    """Bytes resident in the launcher's child whose command line contains `marker`, and its children
    (the Celery pool, gunicorn's workers); 0 while that child is (re)starting."""
    import psutil

    total = 0
    try:
        for child in psutil.Process(launcher_pid).children():
            if any(marker in part for part in child.cmdline()):
                for proc in [child, *child.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
    except psutil.NoSuchProcess:
        pass
    return total


# --- the database, read directly ---------------------------------------------------------------------


class Progress:
    """Counts over the batch's stored images (duplicates and refused files left out)."""

    STORED = "FROM batch_items bi WHERE bi.batch_id = ? AND bi.duplicate = 0 AND bi.error IS NULL"

    def __init__(self, path: Path, batch_id: int):
        self.path, self.batch_id = path, batch_id
        self.conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self.lock = threading.Lock()  # the samplers' threads and the main thread share the connection

    def one(self, sql: str):
        return self.all(sql)[0]

    def all(self, sql: str) -> list:
        with self.lock:
            return self.conn.execute(sql, (self.batch_id,)).fetchall()

    def items(self) -> dict[str, int]:
        total, duplicates, refused = self.one(
            "SELECT COUNT(*), COALESCE(SUM(duplicate), 0), COALESCE(SUM(error IS NOT NULL), 0) "
            "FROM batch_items WHERE batch_id = ?"
        )
        return {"items": total, "duplicates": duplicates, "refused": refused}

    def analysed(self) -> tuple[int, float | None]:
        """Images with a succeeded analysis (each once), and when the last one finished."""
        count, last = self.one(
            "SELECT COUNT(DISTINCT a.image_id), MAX(a.finished_at) FROM analyses a "
            f"WHERE a.status = 'succeeded' AND a.image_id IN (SELECT bi.image_id {self.STORED})"
        )
        return count, parse_utc(last) if last else None

    def failed(self) -> int:
        """Stored images without a succeeded analysis whose analysis or job failed."""
        return self.one(
            f"SELECT COUNT(*) {self.STORED} AND NOT EXISTS (SELECT 1 FROM analyses a WHERE a.image_id = bi.image_id "
            "AND a.status = 'succeeded') AND (EXISTS (SELECT 1 FROM analyses a WHERE a.image_id = bi.image_id "
            "AND a.status = 'failed') OR EXISTS (SELECT 1 FROM jobs j WHERE j.id = bi.job_id AND j.status = 'failed'))"
        )[0]

    def analysed_twice(self) -> int:
        """Images with more than one succeeded analysis by the same model version."""
        return self.one(
            "SELECT COUNT(*) FROM (SELECT a.image_id FROM analyses a WHERE a.status = 'succeeded' AND a.image_id "
            f"IN (SELECT bi.image_id {self.STORED}) GROUP BY a.image_id, a.model_version_id HAVING COUNT(*) > 1)"
        )[0]

    def explanations(self) -> dict[tuple[str, str], tuple[int, float | None]]:
        rows = self.all(
            "SELECT e.method, e.status, COUNT(*), MAX(e.finished_at) FROM explanations e "
            "WHERE e.image_id IN (SELECT bi.image_id FROM batch_items bi WHERE bi.batch_id = ? AND bi.duplicate = 0) "
            "GROUP BY e.method, e.status"
        )
        return {(method, status): (n, parse_utc(last) if last else None) for method, status, n, last in rows}

    def case_range(self) -> tuple[int | None, int | None]:
        return self.one("SELECT MIN(case_id), MAX(case_id) FROM batch_items WHERE batch_id = ?")

    def size_mb(self) -> float:
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return round(sum(f.stat().st_size for f in files if f.exists()) / 1024 / 1024, 1)


def maps_finished(explanations: dict) -> tuple[int, float | None]:
    """Grad-CAM maps done or failed (they come with the prediction), and when the last one finished."""
    rows = [
        v
        for (method, status), v in explanations.items()
        if method.startswith("gradcam") and status in ("done", "failed")
    ]
    return sum(n for n, _ in rows), max((t for _, t in rows if t), default=None)


# --- the upload -------------------------------------------------------------------------------------


class ScaleClient(Client):
    """bench_pipeline's API client, with the browser's batch (`expected_files`) and chunk summaries."""

    def create_batch_expecting(self, name: str, expected: int) -> int:
        response = self.session().post(
            f"{self.base}/api/v1/batches",
            headers=self.headers,
            data={"name": name, "expected_files": str(expected)},
            timeout=60,
        )
        if response.status_code != 201:
            raise RuntimeError(f"Creating a batch answered {response.status_code}: {response.text[:300]}")
        return int(response.json()["id"])

    def send_chunk(self, batch_id: int, paths: list[Path]) -> dict:
        files = [
            ("images", (p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg")) for p in paths
        ]
        response = self.session().post(
            f"{self.base}/api/v1/batches/{batch_id}/files", headers=self.headers, files=files, timeout=300
        )
        if response.status_code != 202:
            raise RuntimeError(f"A chunk of {len(paths)} files answered {response.status_code}: {response.text[:300]}")
        return response.json()


# --- the samplers -----------------------------------------------------------------------------------


class Sampler:
    """Threads that sample, until stop(): process memory and analysed count every second, and the
    pages one after the other."""

    def __init__(self, launcher_pid: int, progress: Progress, pages, baseline: int):
        self.launcher_pid, self.progress, self.pages, self.baseline = launcher_pid, progress, pages, baseline
        self.stopping = threading.Event()
        self.peak = {"web": 0, "worker": 0}
        self.worker_rss_at_baseline: int | None = None
        self.latencies: dict[str, list[float]] = {"case_list": [], "case_page": [], "batch_page": []}
        self.page_errors: list[str] = []
        self.threads = [
            threading.Thread(target=self.memory, daemon=True),
            threading.Thread(target=self.web, daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def worker_rss(self) -> int:
        return tree_rss(self.launcher_pid, "celery")

    def memory(self) -> None:
        while not self.stopping.wait(1.0):
            worker = self.worker_rss()
            self.peak["worker"] = max(self.peak["worker"], worker)
            self.peak["web"] = max(self.peak["web"], tree_rss(self.launcher_pid, "gunicorn"))
            if self.worker_rss_at_baseline is None and self.progress.analysed()[0] >= self.baseline:
                self.worker_rss_at_baseline = worker

    def web(self) -> None:
        session, base, batch_id = self.pages
        rng = random.Random(0)
        while not self.stopping.is_set():
            first, last = self.progress.case_range()
            urls = [("case_list", "/cases"), ("batch_page", f"/batches/{batch_id}")]
            if first is not None:
                urls.insert(1, ("case_page", f"/cases/{rng.randint(first, last)}"))
            for name, url in urls:
                self.time_page(session, name, base + url)
                self.stopping.wait(0.5)

    def time_page(self, session, name: str, url: str) -> None:
        import requests

        started = time.perf_counter()
        try:
            response = session.get(url, timeout=60)
        except requests.RequestException as exc:  # counted, and the sampling goes on
            self.page_errors.append(f"{url}: {exc.__class__.__name__}")
            return
        if response.status_code == 200 and "/login" not in response.url:
            self.latencies[name].append(time.perf_counter() - started)
        else:
            self.page_errors.append(f"{url}: {response.status_code}")


def login(base: str, email: str, password: str):
    import requests

    session = requests.Session()
    match = re.search(r'name="csrf_token" value="([^"]+)"', session.get(f"{base}/login", timeout=30).text)
    if not match:
        raise RuntimeError("The login page has no CSRF token.")
    response = session.post(
        f"{base}/login", data={"email": email, "password": password, "csrf_token": match.group(1)}, timeout=30
    )
    if response.status_code != 200 or "/login" in response.url:
        raise RuntimeError(f"Signing in answered {response.status_code}.")
    return session


# --- the run ----------------------------------------------------------------------------------------


def wait_for_results(progress: Progress, proc: subprocess.Popen, deadline: float) -> bool:
    """Until every stored image has a prediction (or failed) and its Grad-CAM map; False at the deadline."""
    while time.monotonic() < deadline:
        stored = progress.items()
        stored_n = stored["items"] - stored["duplicates"] - stored["refused"]
        analysed, _ = progress.analysed()
        failed = progress.failed()
        maps, _ = maps_finished(progress.explanations())
        if analysed + failed >= stored_n and maps >= analysed:
            return True
        if proc.poll() is not None:
            raise RuntimeError(f"The portal exited ({proc.returncode}) while analysing.")
        time.sleep(2.0)
    return False


def upload(client: ScaleClient, batch_id: int, paths: list[Path], per_request: int) -> dict:
    """Sends the chunks one after the other; a chunk the portal answers with an error is counted and
    the upload goes on (its files count as lost unless the portal stored them after all)."""
    import requests

    totals = {"sent": 0, "stored": 0, "duplicates": 0, "refused": 0, "chunk_errors": 0}
    for index, part in enumerate(chunks(paths, per_request)):
        totals["sent"] += len(part)
        try:
            summary = client.send_chunk(batch_id, part)
        except (RuntimeError, requests.RequestException) as exc:
            totals["chunk_errors"] += 1
            log(f"chunk {index + 1}: {exc}")
            continue
        totals["stored"] += summary["stored"]
        totals["duplicates"] += summary["duplicates"]
        totals["refused"] += len(summary["errors"])
        if index % 20 == 0:
            log(f"sent {totals['sent']} of {len(paths)} files")
    return totals


def summarise(args, measured: dict, progress: Progress, sampler: Sampler) -> dict:
    """The summary from the database and the samplers; `measured` holds what the run itself timed."""
    from webapp.config import usable_cpus

    items = progress.items()
    analysed, last_analysis = progress.analysed()
    failed = progress.failed()
    explanations = progress.explanations()
    maps, last_map = maps_finished(explanations)
    stored_n = items["items"] - items["duplicates"] - items["refused"]
    last = max((t for t in (last_analysis, last_map) if t), default=None)
    uploaded, upload_s = measured["uploaded"], measured["upload_s"]
    to_last = round(last - measured["t0"], 1) if last else None
    final_worker = sampler.worker_rss()
    base = sampler.worker_rss_at_baseline
    shap = {status: n for (method, status), (n, _) in explanations.items() if method == "shap"}
    return {
        "images": measured["images"],
        "analysed": analysed,
        "analysed_twice": progress.analysed_twice(),
        "failed": failed + items["refused"],
        "duplicates": items["duplicates"],
        "lost": (uploaded["sent"] - items["items"]) + (stored_n - analysed - failed),
        "finished_within_limit": measured["finished"],
        "ingest_images_per_s": round(uploaded["sent"] / upload_s, 2),
        "upload_s": round(upload_s, 1),
        "analysis_images_per_s": round(analysed / to_last, 2) if to_last else None,
        "time_to_last_result_s": to_last,
        "gradcam_maps_finished": maps,
        "explanations_finished": shap.get("done", 0),
        "explanations_failed": shap.get("failed", 0),
        "explanations_pending": shap.get("queued", 0) + shap.get("running", 0),
        "web_peak_rss_mb": round(sampler.peak["web"] / 1024 / 1024, 1),
        "worker_peak_rss_mb": round(sampler.peak["worker"] / 1024 / 1024, 1),
        "worker_rss_baseline_images": sampler.baseline,
        "worker_rss_at_baseline_mb": round(base / 1024 / 1024, 1) if base else None,
        "worker_rss_at_end_mb": round(final_worker / 1024 / 1024, 1),
        "worker_rss_growth": round(final_worker / base - 1, 4) if base else None,
        "database_mb": progress.size_mb(),
        "case_list_p95_s": p95(sampler.latencies["case_list"]),
        "case_page_p95_s": p95(sampler.latencies["case_page"]),
        "batch_page_p95_s": p95(sampler.latencies["batch_page"]),
        "page_samples": {name: len(values) for name, values in sampler.latencies.items()},
        "page_errors": len(sampler.page_errors),
        "chunk_errors": uploaded["chunk_errors"],
        "chunk_files": args.chunk,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "portal_ready_s": measured["portal_ready_s"],
        "load_average_start": measured["load_average_start"],
        "load_average_upload": measured["load_average_upload"],
        "load_average_end": load_average(),
    }


def print_table(summary: dict) -> None:
    s = summary
    rows = [
        ("images in the folder", s["images"]),
        ("analysed (each image once) / twice", f"{s['analysed']} / {s['analysed_twice']}"),
        ("failed / duplicates / lost", f"{s['failed']} / {s['duplicates']} / {s['lost']}"),
        ("ingest (upload through the API)", f"{s['ingest_images_per_s']} img/s over {s['upload_s']} s"),
        ("analysis throughput", f"{s['analysis_images_per_s']} img/s"),
        ("time to the last result (prediction + Grad-CAM)", f"{s['time_to_last_result_s']} s"),
        (
            "SHAP explanations finished / pending at the end",
            f"{s['explanations_finished']} / {s['explanations_pending']}",
        ),
        ("peak RSS web / worker", f"{s['web_peak_rss_mb']} / {s['worker_peak_rss_mb']} MB"),
        (
            f"worker RSS after {s['worker_rss_baseline_images']} analysed -> at the end",
            f"{s['worker_rss_at_baseline_mb']} -> {s['worker_rss_at_end_mb']} MB "
            f"(growth {s['worker_rss_growth']}, target < 0.10)",
        ),
        ("database size", f"{s['database_mb']} MB"),
        ("case list p95", f"{s['case_list_p95_s']} s (target <= 0.3)"),
        ("case page p95", f"{s['case_page_p95_s']} s (target <= 0.3)"),
        ("batch page p95", f"{s['batch_page_p95_s']} s"),
        ("page samples / errors", f"{s['page_samples']} / {s['page_errors']}"),
        ("portal start to the ready banner", f"{s['portal_ready_s']} s"),
        (
            "cores; load average at start / upload / end",
            f"{s['cpu_count']}; {s['load_average_start']} / {s['load_average_upload']} / {s['load_average_end']}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nScale benchmark: {s['images']} images, chunks of {s['chunk_files']} files")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def run(args, sources: list[Path], tmp: Path) -> dict:
    measured = {"load_average_start": load_average(), "images": args.images}
    log(f"building a folder of {args.images} images; load average {measured['load_average_start']}")
    copies = tmp / "folder"
    copies.mkdir()
    paths = build_folder(sources, args.images, copies)
    env = portal_env(tmp)
    email, password, token = make_account(env)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = args.out.parent / "scale-portal.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proc = start_portal(env, port, log_path)
    try:
        log(f"portal starting (scripts/run_portal.py, log in {log_path})")
        log(f"portal ready: {wait_for_banner(proc, log_path)!r}")
        measured.update(portal_ready_s=round(time.time() - started, 1), load_average_upload=load_average())
        client = ScaleClient(base, token)
        measured["t0"] = time.time()
        batch_id = client.create_batch_expecting(f"bench-scale {args.images} images", len(paths))
        progress = Progress(tmp / "instance" / "portal.db", batch_id)
        baseline = min(RSS_BASELINE_IMAGES, max(1, args.images // 10))
        sampler = Sampler(proc.pid, progress, (login(base, email, password), base, batch_id), baseline)
        sampler.start()
        try:
            measured["uploaded"] = upload(client, batch_id, paths, args.chunk)
            measured["upload_s"] = time.time() - measured["t0"]
            log(f"uploaded {measured['uploaded']} in {measured['upload_s']:.0f} s; waiting for the results")
            deadline = time.monotonic() + args.max_minutes * 60 - measured["upload_s"]
            measured["finished"] = wait_for_results(progress, proc, deadline)
        finally:
            sampler.stop()
        return summarise(args, measured, progress, sampler)
    finally:
        stop_portal(proc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000, help="folder size")
    parser.add_argument("--chunk", type=int, default=50, help="files per request, as the browser sends them")
    parser.add_argument(
        "--max-minutes", type=float, default=38, help="from the first upload to the last result, at most"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "scale.json")
    args = parser.parse_args(argv)
    if args.images < 1 or args.chunk < 1:
        parser.error("--images and --chunk must be 1 or more")
    sources = sorted(DEFAULT_IMAGES.glob("*.jpg")) if DEFAULT_IMAGES.is_dir() else []
    if not sources:
        print(
            f"The benchmark needs the HAM10000 200x150 images in {DEFAULT_IMAGES} (or set BENCH_IMAGES).",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        summary = run(args, sources, Path(tmp))
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  (written to {args.out})")
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and summary["analysed_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
