"""Load test of `cifarlab serve` on loopback: real CIFAR-10 test images posted to /predict, first by one client on one
keep-alive connection (the latency of a request), then by concurrent clients (throughput and tail latency), repeated
and summarised by medians; with `--workers 1 2` the same runs for each number of worker processes.

    uv run python bench/load.py --model model.onnx [--workers 1 2] [--repeats 3] [--out bench/results/load.json]
    uv run python bench/load.py --url http://127.0.0.1:8000 ...    # a service that is already running

With `--model` the script starts `cifarlab serve --workers N` itself on a free loopback port for each N and stops it at
the end. Each client is a thread with its own keep-alive HTTP connection that sends requests back to back (a closed
loop), cycling through the first test images encoded as PNG. Latency is measured per request from the first byte sent
to the last byte of the answer; requests per second is completed requests over the wall time of the phase. Any status
other than 200, any connection error and any malformed answer counts as an error, and the exit status is 1 if there
was one or if the service did not answer /health afterwards.
"""
import argparse
import http.client
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from cifarlab.data import CLASSES, load_split

BOUNDARY = "cifarlab-load-test"


def multipart(png):
    "A multipart/form-data body holding `png` as the form field `file`."
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="test.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def test_images(data_dir, n):
    "The first `n` test images as multipart bodies, with their labels."
    images, labels = load_split(data_dir, "test")
    bodies = []
    for img in images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, "PNG")
        bodies.append(multipart(buf.getvalue()))
    return bodies, labels[:n]


def cpu_model():
    "The CPU's model name (from /proc/cpuinfo on Linux), or what the platform module knows."
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def wait_healthy(url, proc=None, timeout=60):
    "Poll GET /health until it answers 200; the seconds it took."
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200: return time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url}/health did not answer within {timeout} s")


def start_service(model, workers=1):
    "Start `cifarlab serve` on a free loopback port (--port 0): (process, url, seconds until /health answered)."
    cli = Path(sys.executable).with_name("cifarlab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", "0", "--workers", str(workers),
                             "--log_level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "cifarlab serve: MODEL (...) on http://127.0.0.1:PORT/"
        if " on http://" not in line: raise RuntimeError(f"cifarlab serve did not start: {line!r}")
        url = line.split(" on ", 1)[1].split()[0].rstrip("/")
        wait_healthy(url, proc)
        return proc, url, time.perf_counter() - t0
    except BaseException:
        proc.kill(); proc.wait()
        raise


def stop_service(proc):
    proc.terminate()
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.wait()


def client(url, bodies, labels, next_index, total, record):
    "One client: its own keep-alive connection, requests back to back until `total` have been sent by all clients."
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    while (i := next_index()) < total:
        j = i % len(bodies)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict?k=1", body=bodies[j], headers=headers)
            res = conn.getresponse()
            body = res.read()
            ms = 1000 * (time.perf_counter() - t0)
            if res.status != 200: record(ms, f"HTTP {res.status}: {body[:200]!r}", None)
            else: record(ms, None, json.loads(body)["predictions"][0]["class"] == CLASSES[labels[j]])
        except Exception as e:  # a refused or dropped connection, a malformed answer: an error, then a fresh connection
            record(1000 * (time.perf_counter() - t0), f"{type(e).__name__}: {e}", None)
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.close()


def load_test(url, bodies, labels, clients=8, requests=3000, warmup=20):
    "One closed-loop phase against `url`: `clients` threads sending `requests` in all; a dict of results."
    warm = iter(range(warmup + 1))  # first requests pay for lazy initialisation in the service: not measured
    client(url, bodies, labels, warm.__next__, warmup, lambda *a: None)
    lock, counter = threading.Lock(), iter(range(10**12))
    latencies, errors, correct = [], [], []

    def next_index():
        with lock: return next(counter)

    def record(ms, error, ok):
        with lock:
            latencies.append(ms)
            if error: errors.append(error)
            else: correct.append(ok)

    threads = [threading.Thread(target=client, args=(url, bodies, labels, next_index, requests, record)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"requests": len(lat), "clients": clients, "errors": len(errors), "error_examples": errors[:5],
            "wall_s": wall, "requests_per_second": len(lat) / wall,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                           "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "mean": float(lat.mean())},
            "top1_accuracy_of_answers": float(np.mean(correct)) if correct else None}


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r: return json.loads(r.read())


def summary(runs):
    "Medians over repeated runs of the two phases, and their errors added up."
    med = lambda phase, f: float(np.median([f(r[phase]) for r in runs]))
    return {"runs": len(runs),
            "keepalive_1_client": {"p50_ms": med("keepalive", lambda p: p["latency_ms"]["p50"]),
                                   "p99_ms": med("keepalive", lambda p: p["latency_ms"]["p99"]),
                                   "requests_per_second": med("keepalive", lambda p: p["requests_per_second"])},
            "concurrent": {"clients": runs[0]["concurrent"]["clients"],
                           "requests_per_second": med("concurrent", lambda p: p["requests_per_second"]),
                           "p50_ms": med("concurrent", lambda p: p["latency_ms"]["p50"]),
                           "p99_ms": med("concurrent", lambda p: p["latency_ms"]["p99"])},
            "errors": sum(r[phase]["errors"] for r in runs for phase in ("keepalive", "concurrent")),
            "healthy_after": all(r["healthy_after"] for r in runs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="ONNX model: start `cifarlab serve` with it on a free loopback port")
    where.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="with --model: worker processes to compare (default: 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of both phases for each number of workers (default: 3)")
    ap.add_argument("--keepalive-requests", type=int, default=500, help="requests of the one-client phase (default: 500)")
    ap.add_argument("--clients", type=int, default=8, help="clients of the concurrent phase (default: 8)")
    ap.add_argument("--requests", type=int, default=3000, help="requests of the concurrent phase (default: 3000)")
    ap.add_argument("--images", type=int, default=256, help="how many distinct test images to cycle through")
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = ap.parse_args()
    if args.url and args.workers != [1]: ap.error("--workers applies to a service this script starts (--model)")

    bodies, labels = test_images(args.data_dir, args.images)
    results, model = {}, None
    for workers in args.workers:
        proc, startup = None, None
        if args.model: proc, url, startup = start_service(args.model, workers)
        else: url = args.url.rstrip("/")
        try:
            model = health(url)["model"]
            runs = []
            for _ in range(args.repeats):
                keepalive = load_test(url, bodies, labels, 1, args.keepalive_requests)
                concurrent = load_test(url, bodies, labels, args.clients, args.requests)
                runs.append({"keepalive": keepalive, "concurrent": concurrent, "healthy_after": health(url)["status"] == "ok"})
        finally:
            if proc is not None: stop_service(proc)
        results[str(workers)] = {**summary(runs), "service_startup_s": startup, "each_run": runs}
        s = results[str(workers)]
        print(f"{workers} worker(s), median of {args.repeats}: 1 client keep-alive p50 {s['keepalive_1_client']['p50_ms']:.2f} ms; "
              f"{args.clients} clients {s['concurrent']['requests_per_second']:.0f} requests/s, p99 {s['concurrent']['p99_ms']:.1f} ms; "
              f"{s['errors']} errors", flush=True)

    workers = " ".join(map(str, args.workers))
    result = {"benchmark": "cifarlab serve on loopback: POST /predict with real CIFAR-10 test images (PNG, 32x32), one "
                           "keep-alive client, then concurrent clients; medians of repeated runs",
              # the model by file name only: where it lived on the machine that ran it means nothing elsewhere
              "command": f"uv run python bench/load.py {f'--model {args.model.name} --workers {workers}' if args.model else f'--url {url}'} "
                         f"--repeats {args.repeats} --keepalive-requests {args.keepalive_requests} --clients {args.clients} "
                         f"--requests {args.requests} --images {args.images}",
              "errors": sum(r["errors"] for r in results.values()),
              "healthy_after": all(r["healthy_after"] for r in results.values()),
              "workers": results,
              "model": {k: model[k] for k in ("file", "sha256", "test_accuracy")},
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0 if result["errors"] == 0 and result["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
