"""Load test of `cifarlab serve` on loopback: real CIFAR-10 test images posted to /predict, first by one client on one
keep-alive connection (the latency of a request), then by concurrent clients (throughput and tail latency), repeated
and summarised by medians; with `--workers 1 2` the same runs for each number of worker processes.

    uv run python bench/load.py --model model.onnx [--workers 1 2] [--repeats 3] [--out bench/results/load.json]
    uv run python bench/load.py --model model.onnx --baseline-rev REV ...  # and the service as it was at git revision REV
    uv run python bench/load.py --url http://127.0.0.1:8000 ...    # a service that is already running

With `--model` the script starts `cifarlab serve --workers N` itself on a free loopback port for each N and stops it at
the end. Each client is a thread with its own keep-alive HTTP connection that sends requests back to back (a closed
loop), cycling through the first test images encoded as PNG. A third phase posts `--batch` images a request to
/predict/batch (where the service has it) with the same clients: images per second. Latency is measured per request
from the first byte sent to the last byte of the answer; requests per second is completed requests over the wall time
of the phase. Any status other than 200, any connection error and any malformed answer counts as an error, and the exit
status is 1 if there was one or if the service did not answer /health afterwards.

With `--baseline-rev REV` the same phases also run against `cifarlab serve` from a git worktree of revision REV,
installed with the serve dependencies REV locked (its requirements-serve.txt, in an environment of its own, so that a
change of those counts too; a revision without that file runs in this environment, its package first on PYTHONPATH),
started beside the current one; the two take turns, who goes first alternating between repeats, so that both see the
same machine.
"""
import argparse
import http.client
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from cifarlab.data import CLASSES, load_split

BOUNDARY = "cifarlab-load-test"


def multipart(pngs, field="file"):
    "A multipart/form-data body holding each of `pngs` as the form field `field`."
    part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="test.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return b"".join(part + png + b"\r\n" for png in pngs) + f"--{BOUNDARY}--\r\n".encode()


def test_images(data_dir, n, batch=1):
    """The first `n` test images as requests: (path, multipart body, labels), one image each for /predict, or `batch`
    consecutive ones each for /predict/batch."""
    images, labels = load_split(data_dir, "test")
    pngs = []
    for img in images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    if batch == 1: return [("/predict?k=1", multipart([p]), [int(y)]) for p, y in zip(pngs, labels)]
    return [("/predict/batch?k=1", multipart([pngs[(i + j) % n] for j in range(batch)], "files"),
             [int(labels[(i + j) % n]) for j in range(batch)]) for i in range(0, n, batch)]


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


def baseline_command(src):
    """The `cifarlab` command of checkout `src` installed in an environment of its own with the serve dependencies it
    locks (requirements-serve.txt); None when it has no such file."""
    req = src / "requirements-serve.txt"
    if not req.is_file(): return None
    venv = src.parent / "venv"
    python = venv / "bin" / "python"
    for cmd in (["uv", "venv", "--quiet", "--python", sys.executable, venv],
                ["uv", "pip", "install", "--quiet", "--python", python, "-r", req],
                ["uv", "pip", "install", "--quiet", "--python", python, "--no-deps", src]):
        subprocess.run(list(map(str, cmd)), check=True)
    return venv / "bin" / "cifarlab"


def start_service(model, workers=1, source=None):
    """Start `cifarlab serve` on a free loopback port (--port 0): this environment's, or the checkout `source`'s, in its
    own environment if it has one, else first on PYTHONPATH: (process, url, seconds until /health answered)."""
    cli = (source and baseline_command_of.get(source)) or Path(sys.executable).with_name("cifarlab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source or ""), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(cli), "serve", "--model", str(model), "--port", "0", "--workers", str(workers),
                             "--log_level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
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


def top1(answer):
    "The top class of each image in an answer of /predict (one) or /predict/batch (one per image)."
    return [r["predictions"][0]["class"] for r in answer.get("results", [answer])]


def client(url, requests, next_index, total, record):
    "One client: its own keep-alive connection, requests back to back until `total` have been sent by all clients."
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    while (i := next_index()) < total:
        path, body, labels = requests[i % len(requests)]
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            res = conn.getresponse()
            answer = res.read()
            ms = 1000 * (time.perf_counter() - t0)
            if res.status != 200: record(ms, f"HTTP {res.status}: {answer[:200]!r}", None)
            else:
                got = top1(json.loads(answer))
                if len(got) != len(labels): raise ValueError(f"{len(got)} answers for {len(labels)} images")
                record(ms, None, [g == CLASSES[y] for g, y in zip(got, labels)])
        except Exception as e:  # a refused or dropped connection, a malformed answer: an error, then a fresh connection
            record(1000 * (time.perf_counter() - t0), f"{type(e).__name__}: {e}", None)
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.close()


def load_test(url, bodies, clients=8, requests=3000, warmup=20):
    "One closed-loop phase against `url`: `clients` threads sending `requests` of `bodies` in all; a dict of results."
    warm = iter(range(warmup + 1))  # first requests pay for lazy initialisation in the service: not measured
    client(url, bodies, warm.__next__, warmup, lambda *a: None)
    lock, counter = threading.Lock(), iter(range(10**12))
    latencies, errors, correct = [], [], []

    def next_index():
        with lock: return next(counter)

    def record(ms, error, ok):
        with lock:
            latencies.append(ms)
            if error: errors.append(error)
            else: correct.extend(ok)

    threads = [threading.Thread(target=client, args=(url, bodies, next_index, requests, record)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    images = len(lat) * len(bodies[0][2])
    return {"requests": len(lat), "clients": clients, "errors": len(errors), "error_examples": errors[:5],
            "wall_s": wall, "requests_per_second": len(lat) / wall, "images_per_request": len(bodies[0][2]),
            "images_per_second": images / wall,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                           "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "mean": float(lat.mean())},
            "top1_accuracy_of_answers": float(np.mean(correct)) if correct else None}


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r: return json.loads(r.read())


def has_batch_route(url):
    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as r: return "/predict/batch" in json.loads(r.read())["paths"]


def summary(runs):
    "Medians over repeated runs of each phase, and their errors added up."
    med = lambda phase, f: float(np.median([f(r[phase]) for r in runs]))
    def cpu(phase, per=1):  # the service's CPU time, measured only where this script started the service
        values = [r[phase].get("service_cpu_ms_per_request") for r in runs]
        return None if None in values else float(np.median(values)) / per
    out = {"runs": len(runs),
           "keepalive_1_client": {"p50_ms": med("keepalive", lambda p: p["latency_ms"]["p50"]),
                                  "p99_ms": med("keepalive", lambda p: p["latency_ms"]["p99"]),
                                  "requests_per_second": med("keepalive", lambda p: p["requests_per_second"])},
           "concurrent": {"clients": runs[0]["concurrent"]["clients"],
                          "requests_per_second": med("concurrent", lambda p: p["requests_per_second"]),
                          "p50_ms": med("concurrent", lambda p: p["latency_ms"]["p50"]),
                          "p99_ms": med("concurrent", lambda p: p["latency_ms"]["p99"]),
                          "service_cpu_ms_per_request": cpu("concurrent")},
           "batch": None,
           "errors": sum(r[phase]["errors"] for r in runs for phase in ("keepalive", "concurrent", "batch") if r.get(phase)),
           "healthy_after": all(r["healthy_after"] for r in runs)}
    if runs[0].get("batch"):
        out["batch"] = {"clients": runs[0]["batch"]["clients"], "images_per_request": runs[0]["batch"]["images_per_request"],
                        "images_per_second": med("batch", lambda p: p["images_per_second"]),
                        "service_cpu_ms_per_image": cpu("batch", runs[0]["batch"]["images_per_request"]),
                        "p50_ms": med("batch", lambda p: p["latency_ms"]["p50"]),
                        "p99_ms": med("batch", lambda p: p["latency_ms"]["p99"])}
    return out


def cpu_seconds(pid):
    "User + system CPU seconds of process `pid` and its children (a service's workers): less noisy than wall time."
    import psutil
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def one_run(url, singles, batches, args, pid=None):
    """The phases once against the service at `url` (the batch phase only where it has /predict/batch); with the
    service's `pid`, also its CPU time per request of each phase (warm-up requests included, so a slight overestimate)."""
    run = {}
    phases = [("keepalive", singles, 1, args.keepalive_requests), ("concurrent", singles, args.clients, args.requests)]
    if batches: phases.append(("batch", batches, args.clients, args.batch_requests))
    for name, bodies, clients, n in phases:
        before = cpu_seconds(pid) if pid else None
        run[name] = load_test(url, bodies, clients, n)
        if pid: run[name]["service_cpu_ms_per_request"] = 1000 * (cpu_seconds(pid) - before) / run[name]["requests"]
    run["healthy_after"] = health(url)["status"] == "ok"
    return run


def describe(label, workers, s, clients):
    batch = (f"; /predict/batch of {s['batch']['images_per_request']}: {s['batch']['images_per_second']:.0f} images/s"
             if s["batch"] else "")
    print(f"{label}, {workers} worker(s), median of {s['runs']}: 1 client keep-alive p50 {s['keepalive_1_client']['p50_ms']:.2f} ms; "
          f"{clients} clients {s['concurrent']['requests_per_second']:.0f} requests/s, p99 {s['concurrent']['p99_ms']:.1f} ms"
          f"{batch}; {s['errors']} errors", flush=True)


baseline_command_of = {}  # checkout -> its own `cifarlab` command (baseline_command)


def worktree(rev):
    "A detached git worktree of revision `rev` in a temporary folder: (its path, the full commit id)."
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True)
    if commit.returncode != 0: sys.exit(f"load.py: error: {rev!r} is not a revision of this repository")
    path = Path(tempfile.mkdtemp(prefix="cifarlab-baseline-")) / "src"
    subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(path), rev], check=True)
    baseline_command_of[path] = baseline_command(path)
    return path, commit.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="ONNX model: start `cifarlab serve` with it on a free loopback port")
    where.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="with --model: worker processes to compare (default: 1)")
    ap.add_argument("--baseline-rev", help="with --model: also run the service as it was at this git revision, side by side")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the phases for each number of workers (default: 3)")
    ap.add_argument("--keepalive-requests", type=int, default=500, help="requests of the one-client phase (default: 500)")
    ap.add_argument("--clients", type=int, default=8, help="clients of the concurrent phases (default: 8)")
    ap.add_argument("--requests", type=int, default=3000, help="requests of the concurrent phase (default: 3000)")
    ap.add_argument("--batch", type=int, default=16, help="images a request in the batch phase; 0: no batch phase (default: 16)")
    ap.add_argument("--batch-requests", type=int, default=400, help="requests of the batch phase (default: 400)")
    ap.add_argument("--images", type=int, default=256, help="how many distinct test images to cycle through")
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = ap.parse_args()
    if args.url and (args.workers != [1] or args.baseline_rev):
        ap.error("--workers and --baseline-rev apply to services this script starts (--model)")

    singles = test_images(args.data_dir, args.images)
    batches = test_images(args.data_dir, args.images, args.batch) if args.batch else []
    baseline, commit = worktree(args.baseline_rev) if args.baseline_rev else (None, None)
    sides = {"current": None, **({"baseline": baseline} if baseline else {})}
    results, model = {side: {} for side in sides}, None
    try:
        for workers in args.workers:
            procs, urls, startup = {}, {}, {}
            try:
                for side, source in sides.items():
                    if args.model: procs[side], urls[side], startup[side] = start_service(args.model, workers, source)
                    else: urls[side], startup[side] = args.url.rstrip("/"), None
                model = health(urls["current"])["model"]
                batch_on = {side: bool(batches) and has_batch_route(url) for side, url in urls.items()}
                runs = {side: [] for side in sides}
                for i in range(args.repeats):
                    order = list(sides) if i % 2 == 0 else list(sides)[::-1]  # who goes first alternates
                    for side in order:
                        pid = procs[side].pid if side in procs else None
                        runs[side].append(one_run(urls[side], singles, batches if batch_on[side] else [], args, pid))
            finally:
                for proc in procs.values(): stop_service(proc)
            for side in sides:
                results[side][str(workers)] = {**summary(runs[side]), "service_startup_s": startup[side], "each_run": runs[side]}
                describe(side, workers, results[side][str(workers)], args.clients)
    finally:
        if baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], capture_output=True)
            shutil.rmtree(baseline.parent, ignore_errors=True)

    workers = " ".join(map(str, args.workers))
    target = f"--model {args.model.name} --workers {workers}" if args.model else f"--url {args.url}"
    everything = [w for side in results.values() for w in side.values()]
    result = {"benchmark": "cifarlab serve on loopback: POST /predict with real CIFAR-10 test images (PNG, 32x32), one "
                           "keep-alive client, then concurrent clients, then /predict/batch; medians of repeated runs",
              # the model by file name only: where it lived on the machine that ran it means nothing elsewhere
              "command": f"uv run python bench/load.py {target} "
                         + (f"--baseline-rev {args.baseline_rev} " if args.baseline_rev else "")
                         + f"--repeats {args.repeats} --keepalive-requests {args.keepalive_requests} --clients {args.clients} "
                         f"--requests {args.requests} --batch {args.batch} --batch-requests {args.batch_requests} --images {args.images}",
              "errors": sum(w["errors"] for w in everything),
              "healthy_after": all(w["healthy_after"] for w in everything),
              "workers": results["current"],
              "baseline": {"rev": args.baseline_rev, "commit": commit, "workers": results["baseline"]} if baseline else None,
              "model": {k: model[k] for k in ("file", "sha256", "test_accuracy")},
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0 if result["errors"] == 0 and result["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
