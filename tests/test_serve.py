"""`cifarlab serve` as a real process on loopback, over the small model trained and exported in tests/conftest.py:
/health, predictions on real CIFAR-10 test images, images of every common kind, each kind of bad request answered
4xx (JSON `detail`) with the service still answering, decompression bombs refused fast with flat memory, HEAD, the page,
TCP_NODELAY on accepted connections, worker processes, a small load test through bench/load.py, the page in
headless Chromium finding the right class with nothing broken, `confident` (true on a real image the model is sure of,
false on noise, null for a model without a threshold) and the page's "not sure", and the API docs rendering with the
network cut off."""
import base64
import ctypes
import errno
import functools
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import BIN, ROOT, env_with_venv, free_port, missing, png, run
from cifarlab.data import CLASSES

MAX_UPLOAD = 2**20  # the fixture's --max_upload_mb 1


def start(model, tmp, *extra):
    "Start `cifarlab serve`; (process, base URL, seconds until /health answered 200)."
    port, log = free_port(), open(tmp / "serve.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "cifarlab"), "serve", "--model", str(model), "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env_with_venv())
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 60:
        if proc.poll() is not None: pytest.fail(f"cifarlab serve exited: {(tmp / 'serve.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200: return proc, url, time.perf_counter() - t0
        except httpx.TransportError: time.sleep(0.05)
    proc.kill()
    pytest.fail("cifarlab serve did not answer /health within 60 s")


@pytest.fixture(scope="module")
def server(exported_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc, url, startup = start(exported_model[0], tmp, "--max_upload_mb", "1")
    yield SimpleNamespace(url=url, proc=proc, startup_s=startup, log=tmp / "serve.log", model=exported_model[0])
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sure_and_unsure(exported_model, data_dir):
    """The model's confidence threshold; the real CIFAR-10 test image (as PNG) it is surest of, and seeded uniform
    noise (as PNG), each with the top probability the service's own `Model` gives it.

    The test model is weak (one epoch on 3000 images): the threshold `cifarlab export` chose on the validation split
    (99% accuracy at or above it) is reached by about one image in a thousand, so the whole test set is searched
    rather than its first few hundred images. The tests assert that the image reaches the threshold and the noise
    does not, so they check what they claim whatever this run's training gave."""
    from cifarlab.data import load_split
    from cifarlab.serve import Model
    model = Model(exported_model[0])
    images, _ = load_split(data_dir, "test")
    top = model.probabilities(images).max(1)
    i = int(top.argmax())
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return SimpleNamespace(threshold=model.threshold, image=png(images[i].transpose(1, 2, 0)), image_p=float(top[i]),
                           noise=png(noise), noise_p=float(model.probabilities(noise.transpose(2, 0, 1)[None]).max()))


def assert_meaningful(s):
    "The threshold lies between the noise's top probability and the image's: else the `confident` tests prove nothing."
    assert s.threshold is not None, "the exported test model has no confidence threshold"
    assert s.noise_p < s.threshold <= s.image_p, (f"threshold {s.threshold}: the surest test image has {s.image_p}, "
                                                  f"the noise {s.noise_p}")


def predict(server, data, name="image.png", **kw):
    return httpx.post(server.url + "/predict", files={"file": (name, data, "application/octet-stream")}, timeout=30, **kw)


def assert_still_serving(server, right_image):
    assert server.proc.poll() is None, server.log.read_text()
    r = predict(server, right_image[0])
    assert r.status_code == 200 and r.json()["predictions"][0]["class"] == right_image[1]


def test_serve_module_imports_no_torch():
    # nor the onnx package: the service image has only ONNX Runtime
    code = "import sys, cifarlab.serve; print(sorted({'torch', 'lightning', 'onnx'} & set(sys.modules)))"
    res = run([sys.executable, "-c", code])
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_health(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    m = h["model"]
    assert m["classes"] == list(CLASSES) and m["test_images"] == 10_000 and 0 < m["test_accuracy"] < 1
    assert m["sha256"] == hashlib.sha256(server.model.read_bytes()).hexdigest()
    assert m["input"]["dtype"] == "uint8" and h["limits"]["max_upload_bytes"] == MAX_UPLOAD
    # exported from a checkpoint: calibrated on the validation split, with a confidence threshold
    from cifarlab.contract import open_model
    c = open_model(server.model).contract
    assert m["calibration"] == {"temperature": c["calibration"]["temperature"], "fitted_on": c["calibration"]["fitted_on"]}
    assert m["calibration"]["fitted_on"]["split"] == "validation" and m["calibration"]["fitted_on"]["images"] > 0
    assert m["confidence"] == c["confidence"] and m["confidence"]["target_accuracy"] == 0.99
    assert 0 < m["confidence"]["threshold"] <= 1 and 0 <= m["confidence"]["coverage"] <= 1
    assert server.startup_s < 20  # about a second on an idle machine; generous for a loaded CI box
    assert "on http://127.0.0.1:" in server.log.read_text()  # binds loopback by default


def test_page_is_the_packaged_file(server):
    "GET / answers the page shipped in the package (cifarlab/static/index.html), as HTML, with nothing from another host."
    r = httpx.get(server.url + "/")
    page = (ROOT / "cifarlab" / "static" / "index.html").read_text(encoding="utf-8")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "text/html; charset=utf-8", page)
    assert "https://" not in page and "http://" not in page


def test_predicts_real_test_images(server, right_image):
    r = predict(server, right_image[0])
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 5 and preds[0]["class"] == right_image[1]
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    everything = predict(server, right_image[0], params={"k": 10}).json()["predictions"]
    assert sorted(p["class"] for p in everything) == sorted(CLASSES)
    assert sum(p["probability"] for p in everything) == pytest.approx(1, abs=1e-6)


def test_confident_on_a_real_image_not_on_noise(server, sure_and_unsure):
    s = sure_and_unsure
    assert_meaningful(s)
    for k in (5, 1):  # the top probability is always among those returned
        sure, unsure = predict(server, s.image, params={"k": k}).json(), predict(server, s.noise, params={"k": k}).json()
        assert sure["confident"] is True and sure["predictions"][0]["probability"] == pytest.approx(s.image_p, abs=1e-6)
        assert unsure["confident"] is False and unsure["predictions"][0]["probability"] == pytest.approx(s.noise_p, abs=1e-6)
    r = httpx.post(server.url + "/predict/batch", timeout=30, files=[
        ("files", ("sure.png", s.image, "image/png")), ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("noise.png", s.noise, "image/png"))])
    assert r.status_code == 200, r.text
    assert [x.get("confident", "absent") for x in r.json()["results"]] == [True, "absent", False]


def model_without_threshold(model, folder):
    "A copy of `model` whose contract is as an export before calibration wrote it: no `calibration`, no `confidence`."
    import onnx
    from cifarlab.contract import open_model, write_contract
    c = open_model(model).contract
    del c["calibration"], c["confidence"]
    onnx.save(write_contract(onnx.load(model), c), folder / "old.onnx")
    return folder / "old.onnx"


@pytest.fixture(scope="module")
def server_without_threshold(exported_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-old")
    proc, url, _ = start(model_without_threshold(exported_model[0], tmp), tmp)
    yield SimpleNamespace(url=url, proc=proc, log=tmp / "serve.log")
    proc.terminate()
    proc.wait(timeout=30)


def test_confident_is_null_without_a_threshold(server_without_threshold, sure_and_unsure):
    s = sure_and_unsure
    m = httpx.get(server_without_threshold.url + "/health").json()["model"]
    assert (m["calibration"], m["confidence"]) == (None, None)
    for data in (s.image, s.noise):
        r = predict(server_without_threshold, data)
        assert r.status_code == 200 and r.json()["confident"] is None, r.text
    r = httpx.post(server_without_threshold.url + "/predict/batch", files=[("files", ("noise.png", s.noise, "image/png"))])
    assert r.json()["results"][0]["confident"] is None


def png_raw(width, height, bit_depth, color_type, rows):
    "A PNG written by hand (Pillow cannot write 16-bit RGB): IHDR, one IDAT of `rows` (filter bytes included), IEND."
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def a_picture():
    "The picture every kind below encodes: 60x80 RGB noise, the same each time."
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))


@functools.cache  # built once, not once a parametrised test
def kinds_of_images():
    rng = np.random.default_rng(1)
    pic = a_picture()
    pal = pic.convert("P")
    pal.info["transparency"] = 0
    rgb16 = b"".join(b"\x00" + rng.integers(0, 256, 40 * 6, dtype=np.uint8).tobytes() for _ in range(30))
    return {
        "grayscale": png(pic.convert("L")), "1-bit": png(pic.convert("1")), "RGBA": png(pic.convert("RGBA")),
        "gray+alpha": png(pic.convert("LA")), "palette+transparency": png(pal),
        "16-bit gray": png(Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16))),
        "16-bit RGB": png_raw(40, 30, 16, 2, rgb16), "JPEG": png(pic, "JPEG"), "CMYK JPEG": png(pic.convert("CMYK"), "JPEG"),
        "animated GIF": png(pal, "GIF", save_all=True, append_images=[pic.convert("P")]), "BMP": png(pic, "BMP"),
        "TIFF": png(pic, "TIFF"), "WebP": png(pic, "WEBP"), "1x1": png(np.zeros((1, 1, 3), np.uint8)),
        "very wide": png(np.zeros((3, 3000, 3), np.uint8)), "12 MP JPEG": png(pic.resize((4000, 3000)), "JPEG"),
    }


@functools.cache
def same_pixels():
    "kind -> a plain 8-bit RGB PNG of the very pixels that kind holds losslessly: the service must answer both alike."
    pic = a_picture()
    rgb, grey, bits = png(pic), png(pic.convert("L").convert("RGB")), png(pic.convert("1").convert("RGB"))
    return {"BMP": rgb, "TIFF": rgb, "RGBA": rgb, "grayscale": grey, "gray+alpha": grey, "1-bit": bits}


@pytest.mark.parametrize("kind", list(kinds_of_images()))
def test_every_kind_of_image_is_classified(server, kind):
    r = predict(server, kinds_of_images()[kind], params={"k": 10})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = [p["probability"] for p in preds]
    assert sorted(p["class"] for p in preds) == sorted(CLASSES) and probs == sorted(probs, reverse=True), preds
    assert sum(probs) == pytest.approx(1, abs=1e-6)
    if kind in same_pixels():  # the same pixels in another container: the same answer, to the last digit
        assert preds == predict(server, same_pixels()[kind], params={"k": 10}).json()["predictions"]


@functools.cache
def bomb(width, height, complete=True):
    "A valid 8-bit gray PNG of `width`x`height` zeros (compressed about 1000:1); incomplete: only its first rows."
    z, rows = zlib.compressobj(9), bytes(width + 1)
    idat = b"".join(z.compress(rows) for _ in range(height if complete else 8)) + z.flush()
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@functools.cache
def jpeg_declaring(width, height):
    "A small real JPEG whose frame header declares `width`x`height`."
    data = bytearray(png(np.zeros((16, 16, 3), np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def chunked_upload(size):
    "A multipart body sent with chunked transfer encoding (no Content-Length), `size` bytes of file content."
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for _ in range(size // 65536): yield bytes(65536)
        yield b"\r\n--b--\r\n"
    return dict(content=body(), headers={"content-type": "multipart/form-data; boundary=b"})


def bad_requests(good):
    "name: (keyword arguments of httpx.post, the status the service must answer)"
    file = lambda data: dict(files={"file": ("x.png", data, "image/png")})
    return {
        "empty body": (dict(), 422),
        "empty file": (file(b""), 400),
        "text, not an image": (file(b"hello, I am not an image"), 415),
        "random bytes": (file(np.random.default_rng(1).bytes(5000)), 415),
        "truncated PNG": (file(good[: len(good) // 2]), 400),
        "PNG with corrupt pixel data": (file(good[:len(good) // 2] + bytes(50) + good[len(good) // 2 + 50:]), 400),
        "PNG with a corrupt header": (file(good[:40] + bytes(20) + good[60:]), 415),  # Pillow cannot tell it is a PNG
        "over the upload limit": (file(bytes(MAX_UPLOAD + 1)), 413),
        "far over the upload limit": (file(bytes(20 * MAX_UPLOAD)), 413),
        "over the limit, chunked": (chunked_upload(2 * MAX_UPLOAD), 413),
        "missing form field": (dict(data={"comment": "no file here"}), 422),
        "misnamed form field": (dict(files={"image": ("x.png", good, "image/png")}), 422),
        "JSON instead of a form": (dict(json={"file": "x.png"}), 422),
        "multipart without a boundary": (dict(content=b"x", headers={"content-type": "multipart/form-data"}), 400),
        "k out of range": (dict(files={"file": ("x.png", good, "image/png")}, params={"k": 0}), 422),
        "bomb: 5000x5000 PNG": (file(bomb(5000, 5000)), 413),
        "bomb: 100000x100000 PNG": (file(bomb(100_000, 100_000, complete=False)), 413),
        "bomb: 60000x60000 JPEG": (file(jpeg_declaring(60_000, 60_000)), 413),
    }


@pytest.mark.parametrize("name", list(bad_requests(b"")))
def test_bad_request_gets_4xx_and_service_carries_on(server, right_image, name):
    kw, status = bad_requests(right_image[0])[name]
    r = httpx.post(server.url + "/predict", timeout=30, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["detail"], r.text  # every refusal: JSON `detail`
    if status == 413:  # the limit is named, whether it was the upload's size (declared or streamed) or the image's
        assert "limit of 1,048,576 bytes" in r.text or "limit is 16,777,216 pixels" in r.text, r.text
    assert_still_serving(server, right_image)


def peak_rss_kb(pid):
    return int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])


def test_bombs_are_refused_fast_with_flat_memory(server, right_image):
    if not Path("/proc/self/status").exists(): missing("reads peak memory from /proc (Linux)")
    bombs = [bomb(12_000, 12_000), bomb(100_000, 100_000, complete=False), jpeg_declaring(65_000, 65_000)]
    assert max(map(len, bombs)) < 200_000  # small files: 144 million pixels (or far more) declared
    assert_still_serving(server, right_image)
    before = peak_rss_kb(server.proc.pid)
    for data in bombs:  # the bombs are built above, outside the timed window; a median of 3 rides out a busy moment
        seconds = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert predict(server, data).status_code == 413
            seconds.append(time.perf_counter() - t0)
        assert sorted(seconds)[1] < 2, seconds  # decoding 144 million pixels takes longer than that here
    assert peak_rss_kb(server.proc.pid) - before < 50_000  # decoding any of them would take 144 MB or more
    assert_still_serving(server, right_image)


def test_openapi_docs(server):
    r = httpx.get(server.url + "/docs")  # its scripts and styles come from the service, not from a CDN
    assert r.status_code == 200 and "/docs-assets/" in r.text and "https://" not in r.text, r.text
    assert httpx.get(server.url + "/redoc").status_code == 404  # ReDoc's page would fetch its logo from the internet
    assert httpx.get(server.url + "/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "file" in json.dumps(spec["components"]) or "file" in json.dumps(body)
    assert {"400", "413", "415", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    # the answers are described field by field: `confident` a boolean or null, saying what it means and whence its threshold
    ok = lambda path: spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]
    single, batch = ok("/predict"), ok("/predict/batch")
    assert set(single["schema"]["properties"]) == {"predictions", "confident", "image", "model"}
    for confident in (single["schema"]["properties"]["confident"],
                      batch["schema"]["properties"]["results"]["items"]["properties"]["confident"]):
        assert confident["type"] == ["boolean", "null"], confident
        assert all(w in confident["description"] for w in ("threshold", "validation split", "99%", "null")), confident
    assert isinstance(single["example"]["confident"], bool)


def test_load_small(exported_model, data_dir, tmp_path):
    """bench/load.py at a small size, starting the service itself with 2 workers, and beside it the service of this
    checkout's HEAD as the baseline: no errors (the benchmark runs it at full size)."""
    if not (ROOT / ".git").exists(): missing("a git checkout (for --baseline-rev HEAD)")
    out = tmp_path / "load.json"
    res = run([sys.executable, ROOT / "bench" / "load.py", "--model", exported_model[0], "--workers", "2", "--repeats", "1",
               "--keepalive-requests", "50", "--clients", "4", "--requests", "200", "--images", "48", "--batch", "8",
               "--batch-requests", "12", "--baseline-rev", "HEAD", "--data-dir", data_dir, "--out", out], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["healthy_after"] and r["machine"]["cpu"] and list(r["workers"]) == ["2"]
    assert r["baseline"]["rev"] == "HEAD" and list(r["baseline"]["workers"]) == ["2"] and len(r["baseline"]["commit"]) == 40
    for side in (r["workers"], r["baseline"]["workers"]):
        run_ = side["2"]["each_run"][0]
        assert run_["keepalive"]["requests"] == 50 and run_["concurrent"]["requests"] == 200
        assert run_["batch"]["requests"] == 12 and run_["batch"]["images_per_request"] == 8
        s, b = side["2"]["concurrent"], side["2"]["batch"]
        assert 0 < s["p50_ms"] <= s["p99_ms"] and s["requests_per_second"] > 0 and b["images_per_second"] > 0
        # every answer was checked: as many top-1 verdicts as images answered
        assert 0 <= run_["batch"]["top1_accuracy_of_answers"] <= 1
    assert not [line for line in run(["git", "worktree", "list"]).stdout.splitlines() if "cifarlab-baseline-" in line]


@pytest.mark.parametrize("case", ["missing model", "not a model", "port in use"])
def test_cli_errors(case, server, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    args = {"missing model": ["--model", tmp_path / "none.onnx"], "not a model": ["--model", junk],
            "port in use": ["--model", server.model, "--port", server.url.rsplit(":", 1)[1]]}[case]
    res = run([BIN / "cifarlab", "serve", *args], timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("cifarlab serve: error:"), res.stderr
    assert {"missing model": "does not exist", "not a model": "is not an ONNX model",
            "port in use": "already in use"}[case] in res.stderr


def test_head_answers_wherever_get_does(server):
    for path in ("/", "/health", "/docs", "/openapi.json"):
        get, head = httpx.get(server.url + path), httpx.head(server.url + path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-length"] == str(len(get.content)), path
    assert httpx.head(server.url + "/predict").status_code == 405  # POST only, like GET


def server_side_nodelay(pids, client):
    """TCP_NODELAY on the service's end of `client`'s connection and the pid holding it, found among the sockets of
    processes `pids` by copying each descriptor into this process (Linux's pidfd_getfd)."""
    if not hasattr(os, "pidfd_open"): missing("needs Linux's pidfd_open and pidfd_getfd")
    libc, peer = ctypes.CDLL(None, use_errno=True), client.getsockname()
    for pid in pids:
        pidfd = os.pidfd_open(pid)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"): continue
                except OSError: continue
                copy = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd(2), the same number on every architecture
                if copy < 0:
                    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM): missing("pidfd_getfd is not allowed here")
                    continue
                with socket.socket(fileno=copy) as s:
                    try: ours = s.family == client.family and s.getpeername() == peer
                    except OSError: ours = False
                    if ours: return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), pid
        finally: os.close(pidfd)
    pytest.fail(f"no socket connected to {peer} in processes {pids}")


def keepalive_connection(url):
    "An HTTP connection that has made two requests (so it is a reused, keep-alive one)."
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    for _ in range(2):
        conn.request("GET", "/health")
        assert conn.getresponse().read()
    return conn


def test_accepted_connections_have_tcp_nodelay(server):
    "Nagle's algorithm is off on the running service's connections, so a keep-alive response is sent at once."
    conn = keepalive_connection(server.url)
    nodelay, _ = server_side_nodelay([server.proc.pid], conn.sock)
    conn.close()
    assert nodelay != 0


def metric(url, name, **labels):
    "The value of one sample of the service's /metrics (None when it is absent)."
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", headers={"connection": "close"}).text
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == name and s.labels == labels), None)


def worker_pids(proc):
    "The pids of `cifarlab serve --workers N`'s live worker processes (spawned by multiprocessing; not the dead, unreaped)."
    alive = set()
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()): alive.add(p.pid)
        except psutil.Error: pass  # gone, or dead and not yet reaped
    return alive


def test_workers_share_the_port_their_metrics_and_the_json_log(exported_model, tmp_path):
    proc, url, startup = start(exported_model[0], tmp_path, "--workers", "2", "--log_format", "json")
    try:
        workers = [psutil.Process(pid) for pid in worker_pids(proc)]
        assert len(workers) == 2, workers
        conn = keepalive_connection(url)
        nodelay, pid = server_side_nodelay([w.pid for w in workers], conn.sock)
        conn.close()
        assert nodelay != 0 and pid in {w.pid for w in workers}  # a worker holds the connection, not the parent
        assert "with 2 workers" in (tmp_path / "serve.log").read_text()
        # each request on a new connection, so both workers answer some; whichever answers /metrics counts them all
        for i in range(20): assert httpx.get(url + "/livez", headers={"x-request-id": f"probe-{i}"}).status_code == 200
        logged = lambda: {json.loads(line)["request_id"] for line in (tmp_path / "serve.log").read_text().splitlines()
                          if line.startswith("{")}
        deadline = time.monotonic() + 10  # a request's line is written once its answer has been sent
        while not {f"probe-{i}" for i in range(20)} <= logged():
            assert time.monotonic() < deadline, sorted(logged())
            time.sleep(0.05)
        counts = [metric(url, "cifarlab_requests_total", route="/livez", method="GET", status="200") for _ in range(6)]
        assert counts == [20] * 6, counts
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive  # stopping the service stops its workers
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_a_killed_workers_request_in_flight_is_dropped_by_its_replacement(exported_model, tmp_path):
    """--workers 2: a worker killed (SIGKILL) while it holds a request leaves that request counted as in flight until
    uvicorn's replacement worker starts and drops it; the requests it had answered stay counted."""
    proc, url, _ = start(exported_model[0], tmp_path, "--workers", "2")
    try:
        for _ in range(6): assert httpx.get(url + "/livez", headers={"connection": "close"}).status_code == 200
        before = worker_pids(proc)
        held = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
        held.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000\r\n\r\n--b\r\n")  # a body that never comes: in flight until killed
        deadline = time.monotonic() + 30
        while metric(url, "cifarlab_requests_in_flight") != 2:  # it, and the /metrics request asking
            assert time.monotonic() < deadline, metric(url, "cifarlab_requests_in_flight")
            time.sleep(0.05)
        _, holder = server_side_nodelay(sorted(before), held)
        os.kill(holder, signal.SIGKILL)
        while not (len(worker_pids(proc)) == 2 and holder not in worker_pids(proc)):  # uvicorn replaces the dead worker
            assert time.monotonic() < deadline + 30, worker_pids(proc)
            time.sleep(0.1)
        while metric(url, "cifarlab_requests_in_flight") != 1:  # only the asking request, once the replacement starts
            assert time.monotonic() < deadline + 60, metric(url, "cifarlab_requests_in_flight")
            time.sleep(0.1)
        assert metric(url, "cifarlab_requests_total", route="/livez", method="GET", status="200") == 6  # nothing lost
        held.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_the_requests_in_flight_then_exits_0(exported_model, right_image, tmp_path, workers):
    """Four uploads half sent when SIGTERM arrives: each is still answered 200 with its prediction, and the service
    exits with status 0 within its grace period."""
    proc, url, _ = start(exported_model[0], tmp_path, "--workers", str(workers), "--grace_s", "20")
    port = int(url.rsplit(":", 1)[1])
    data, expected = right_image
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="cat.png"\r\nContent-Type: image/png\r\n\r\n'
            + data + b"\r\n--b--\r\n")
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    clients = []
    try:
        for _ in range(4):
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            c.sendall(head + body[:len(body) // 2])
            clients.append(c)
        deadline = time.monotonic() + 30  # until the service is answering all four (and this /metrics request)
        while metric(url, "cifarlab_requests_in_flight") != 5:
            assert time.monotonic() < deadline, metric(url, "cifarlab_requests_in_flight")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while True:  # until it takes no new request: it is shutting down, with the four still in flight
            try: httpx.get(url + "/livez", timeout=0.5)
            except httpx.TransportError: break
            assert time.monotonic() < deadline, "still answering new requests 20 s after SIGTERM"
            time.sleep(0.05)
        answers = []
        for c in clients:
            c.sendall(body[len(body) // 2:])
            reply = b""
            while chunk := c.recv(65536): reply += chunk  # the service closes the connection after answering
            answers.append(reply)
        for reply in answers:
            status_line, _, rest = reply.partition(b"\r\n")
            assert status_line == b"HTTP/1.1 200 OK", reply[:300]
            assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["predictions"][0]["class"] == expected
        assert proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        for c in clients: c.close()
        if proc.poll() is None: proc.kill(); proc.wait()


@pytest.fixture
def screenshots(tmp_path):
    "Where the browser tests save screenshots: $CIFARLAB_SCREENSHOTS when set, else the test's temporary folder."
    d = Path(os.environ.get("CIFARLAB_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


BROKEN = """() => [...document.querySelectorAll("body *")].filter((e) => e.checkVisibility()).filter((e) =>
    (e.tagName === "IMG" && !(e.complete && e.naturalWidth > 0)) ||
    (e.id === "out" && !document.querySelector("#results li"))).map((e) => e.outerHTML.slice(0, 120))"""


def test_page_classifies_a_real_image(server, right_image, browser, screenshots):
    data, expected = right_image
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the browser logs a refused fetch (the 415 and 413 below) as a console error; anything else is a fault
    page.on("console", lambda m: m.type == "error" and "415" not in m.text and "413" not in m.text and errors.append(m.text))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#facts').textContent.includes('test accuracy')")
    # before any upload: the drop zone, no result box, no broken image
    assert not page.is_visible("#out") and page.evaluate(BROKEN) == []
    page.screenshot(path=screenshots / "page-before-upload.png", full_page=True)

    # pick a file, as a person does with the file dialog
    page.set_input_files("#file", files=[{"name": "cifar.png", "mimeType": "image/png", "buffer": data}])
    page.wait_for_selector("#results li")
    assert page.locator("#results li").count() == 5
    assert page.locator("#results li .label").first.text_content() == expected
    page.wait_for_function("document.querySelector('#preview').complete")
    assert page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth") == 32
    widths = page.eval_on_selector_all("#results .fill", "els => els.map(e => parseFloat(e.style.width))")
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert page.evaluate(BROKEN) == []
    page.screenshot(path=screenshots / "page-classified.png", full_page=True)

    # drop files on the zone, as a person drags them: something that is not an image, one over the upload limit,
    # then the image
    def drop(content, name, mime):
        dt = page.evaluate_handle("""([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime})); return dt; }""",
                                  [base64.b64encode(content).decode(), name, mime])
        page.dispatch_event("#drop", "drop", {"dataTransfer": dt})

    for content, name, mime, status, shot in [(b"not an image", "notes.txt", "text/plain", "415", "page-refused-415.png"),
                                              (bytes(2 * MAX_UPLOAD), "huge.png", "image/png", "413", "page-refused-413.png")]:
        drop(content, name, mime)
        page.wait_for_function(f"document.querySelector('#status').textContent.includes('{name} was not classified')")
        text = page.text_content("#status")
        assert status in text and page.evaluate("document.querySelector('#status').className") == "error", text
        if status == "413": assert "limit of 1,048,576 bytes" in text, text  # the page shows the limit
        assert page.locator("#results li").count() == 0 and not page.is_visible("#out")
        assert page.evaluate(BROKEN) == []  # no broken preview left behind
        page.screenshot(path=screenshots / shot, full_page=True)
    drop(data, "again.png", "image/png")
    page.wait_for_selector("#results li")
    assert page.locator("#results li .label").first.text_content() == expected
    assert not errors, errors
    page.close()


def guesses(answer):
    "The page's words for an answer's top three classes: whole percentages, rounded as JavaScript's Math.round does."
    pct = lambda p: "<1%" if p < 0.005 else f"{math.floor(100 * p + 0.5)}%"
    return ", ".join(f"{p['class']} {pct(p['probability'])}" for p in answer["predictions"][:3])


def test_page_says_not_sure_with_the_best_guesses(server, sure_and_unsure, browser, screenshots):
    "Noise: \"Not sure\" in words with the best guesses, the top bar not marked; the image the model is sure of: no \"not sure\"."
    s = sure_and_unsure
    assert_meaningful(s)
    noise_answer = predict(server, s.noise).json()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#facts').textContent.includes('test accuracy')")
    assert "confident from a top probability of" in page.text_content("#facts")

    page.set_input_files("#file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": s.noise}])
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('noise.png: ')")
    assert page.is_visible("#verdict") and page.locator("#results li").count() == 5
    assert page.inner_text("#verdict") == f"Not sure \u2014 best guesses: {guesses(noise_answer)}"
    assert page.get_attribute("#results", "aria-label") == "best guesses (not sure)"
    fills = page.eval_on_selector_all("#results .fill", "els => els.map((e) => getComputedStyle(e).backgroundColor)")
    assert fills[0] == fills[1], fills  # no green on the top guess: nothing is marked as the answer
    assert page.evaluate(BROKEN) == []
    page.screenshot(path=screenshots / "page-not-sure.png", full_page=True)

    page.set_input_files("#file", files=[{"name": "cifar.png", "mimeType": "image/png", "buffer": s.image}])
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('cifar.png: ')")
    assert not page.is_visible("#verdict") and "not sure" not in page.inner_text("body").lower()
    sure_answer = predict(server, s.image).json()
    assert page.locator("#results li .label").first.text_content() == sure_answer["predictions"][0]["class"]
    assert page.get_attribute("#results", "aria-label") == "top-5 classes"
    fills = page.eval_on_selector_all("#results .fill", "els => els.map((e) => getComputedStyle(e).backgroundColor)")
    assert fills[0] != fills[1], fills  # the answer's bar is marked, as before
    page.screenshot(path=screenshots / "page-confident.png", full_page=True)
    assert not errors, errors
    page.close()


def test_page_without_a_threshold_is_as_before(server_without_threshold, sure_and_unsure, browser):
    "A model without a threshold (`confident: null`): even noise is shown as an answer, top class first, with no \"not sure\"."
    page = browser.new_page()
    page.goto(server_without_threshold.url + "/")
    page.wait_for_function("document.querySelector('#facts').textContent.includes('test accuracy')")
    assert "confident from" not in page.text_content("#facts")
    page.set_input_files("#file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": sure_and_unsure.noise}])
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('noise.png: ')")
    assert not page.is_visible("#verdict") and "not sure" not in page.inner_text("body").lower()
    top = predict(server_without_threshold, sure_and_unsure.noise).json()["predictions"][0]["class"]
    assert page.locator("#results li .label").first.text_content() == top
    page.close()


def test_docs_render_offline(server, browser, screenshots):
    "/docs in Chromium with every request to a host other than this machine refused: the API's operations are listed."
    page = browser.new_page()
    refused = []
    def only_loopback(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"): return route.continue_()
        refused.append(route.request.url)
        return route.abort()
    page.route("**/*", only_loopback)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map((e) => e.textContent.trim())")
    assert {"/predict", "/health"} <= set(paths), paths
    assert page.is_visible("a[href*='openapi.json']")  # Swagger UI links the schema under the title
    page.screenshot(path=screenshots / "docs.png", full_page=True)
    assert refused == [], refused
    page.close()
