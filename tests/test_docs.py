"""The Quarto-free docs site (docs/build.py), built into a temporary folder and read in a real browser:
every page nbs/sidebar.yml lists is in the navigation and renders cleanly, and no link or image is broken."""
import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow  # left out of the quick subset (`-m "not slow"`)


def sidebar_pages():
    "The page each notebook in nbs/sidebar.yml becomes: its `output-file` in nbdev's processed copy."
    def entries(items):
        for item in items:
            if isinstance(item, str): yield item
            else:
                if "href" in item: yield item["href"]
                yield from entries(item.get("contents", []))
    contents = yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    pages = set()
    for nb in entries(contents):
        first = json.loads((ROOT / "_proc" / nb).read_text())["cells"][0]  # nbdev's front matter cell
        out = yaml.safe_load("".join(first["source"]).split("---")[1])["output-file"]
        pages.add((Path(nb).parent / out).as_posix())
    return pages


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    res = subprocess.run([sys.executable, "docs/build.py", "--strict", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="module")
def base_url(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_build_writes_every_sidebar_page(site):
    pages = sidebar_pages()
    assert "index.html" in pages
    for page in pages: assert (site / page).is_file(), page


def test_model_card_is_a_page(site):
    "The pipeline model's card (model_card.md, written by `dvc repro`) is rendered as a page of the site."
    card = ROOT / "model_card.md"
    assert card.is_file(), "model_card.md is missing: run `uv run dvc repro` (its card stage writes it)"
    html = (site / "model_card.html").read_text()
    for heading in ("Calibration", "Robustness", "Not sure", "Known limits"): assert heading in html, heading


def test_site_in_browser(base_url, browser):
    page = browser.new_page()
    errors = []  # uncaught exceptions and console errors (a failed request for a script or style is one)
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
    page.on("console", lambda m: m.type == "error" and errors.append(f"{page.url}: {m.text}"))

    def visit(url):
        res = page.goto(url)
        assert res and res.status == 200, url
        h1 = page.locator("h1").first
        assert h1.is_visible(), url
        broken = page.eval_on_selector_all("img", "els => els.filter(i => !i.naturalWidth).map(i => i.src)")
        assert not broken, f"{url}: images that did not load: {broken}"
        return h1.text_content()

    assert "cifarlab" in visit(base_url + "index.html")
    assert "cifarlab" in page.title()

    # The navigation: the sidebar's links, which the build makes from nbs/sidebar.yml, and the pipeline model's card.
    nav = {urldefrag(u).url for u in page.eval_on_selector_all("nav.bd-docs-nav a[href]", "as => as.map(a => a.href)")}
    assert {u.removeprefix(base_url) for u in nav} == sidebar_pages() | {"model_card.html"}

    links = set()
    for url in sorted(nav):
        visit(url)
        hrefs = page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)")
        links |= {u for u in hrefs if u.startswith(base_url)}

    # Every same-site link: the target answers, and a #fragment names an element on it.
    for link in sorted(links):
        url, frag = urldefrag(link)
        res = page.request.get(url)
        assert res.status == 200, link
        if frag and url.endswith(".html"):
            assert f'id="{frag}"' in res.text(), f"{link}: no element with that id"
    assert not errors, errors
