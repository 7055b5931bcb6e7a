"""Load test of `cifarlab serve` on loopback: concurrent clients post real CIFAR-10 test images to /predict, and the
run reports latency percentiles, requests per second and every error.

    uv run python bench/load.py --model model.onnx [--clients 8] [--requests 3000] [--out bench/results/load.json]
    uv run python bench/load.py --url http://127.0.0.1:8000 ...    # a service that is already running

With `--model` the script starts `cifarlab serve` itself on a free loopback port and stops it at the end. Each client
is a thread with its own keep-alive HTTP connection that sends requests back to back (a closed loop), cycling through
the first test images encoded as PNG. Latency is measured per request from the first byte sent to the last byte of the
answer; requests per second is completed requests over the wall time of the run. Any status other than 200, any
connection error and any malformed answer counts as an error, and the exit status is 1 if there was one.
"""
import argparse
import http.client
import io
import json
import os
import platform
import socket
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_service(model, extra=()):
    "Start `cifarlab serve` on a free loopback port: (process, url, seconds until /health answered)."
    port = free_port()
    cli = Path(sys.executable).with_name("cifarlab")
    proc = subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", str(port), "--log-level", "warning", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try: return proc, url, wait_healthy(url, proc)
    except BaseException:
        proc.kill(); proc.wait()
        raise


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
    "Run the closed-loop load test against `url`; a dict of results."
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="ONNX model: start `cifarlab serve` with it on a free loopback port")
    where.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--images", type=int, default=256, help="how many distinct test images to cycle through")
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = ap.parse_args()

    bodies, labels = test_images(args.data_dir, args.images)
    proc, startup = None, None
    if args.model: proc, url, startup = start_service(args.model)
    else: url = args.url.rstrip("/")
    try:
        health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
        result = load_test(url, bodies, labels, args.clients, args.requests)
        alive = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())["status"] == "ok"
    finally:
        if proc is not None:
            proc.terminate(); proc.wait(timeout=30)
    result = {"benchmark": "cifarlab serve under load: POST /predict with real CIFAR-10 test images (PNG, 32x32) on loopback",
              # the model by file name only: where it lived on the machine that ran it means nothing elsewhere
              "command": f"uv run python bench/load.py {f'--model {args.model.name}' if args.model else f'--url {url}'} "
                         f"--clients {args.clients} --requests {args.requests} --images {args.images}",
              **result, "healthy_after": alive, "service_startup_s": startup,
              "model": {k: health["model"][k] for k in ("file", "sha256", "test_accuracy")},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_ms"]
    print(f"{result['requests']} requests from {result['clients']} clients: {result['errors']} errors, "
          f"p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, {result['requests_per_second']:.0f} requests/s -> {args.out}")
    return 0 if result["errors"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
