"""Build the docs site as static HTML without Quarto.

    uv run python docs/build.py [--out DIR] [--strict]

nbdev processes the notebooks into `_proc/` exactly as for its Quarto site; this script then reshapes
them for Sphinx + myst-nb (docs/conf.py), orders the pages as nbs/sidebar.yml does, and renders them
into DIR (default `_site/`). The new site replaces DIR only once it is complete.
"""
import argparse
import os
import posixpath
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def fail(msg):
    sys.exit(f"docs build failed: {msg}")


def process_notebooks():
    """Run nbdev's notebook processors (front matter, rendered `show_doc`, hidden cells dropped) into `_proc/`.

    This is the working half of `nbdev_proc_nbs`, which we can't call: it first installs Quarto and
    pip-installs the package when Quarto is missing. Its other steps are left out on purpose:
    `refresh_quarto_yml` only rewrites Quarto's yml files in nbs/, `nbdev_sidebar` does nothing with
    `custom_sidebar = True`, and the symbol index `_build_modidx` writes is `nbdev_export`'s job."""
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cfg = get_config()  # found from the working directory, hence main()'s chdir
    # in this process (n_workers=0): the package (torch, Lightning) is imported once, not once a worker process
    return proc_nbs(cfg.nbs_path, n_workers=0), cfg


def toc_groups(contents):
    """Turn sidebar.yml's `contents` into toctrees: [(caption or None, [notebook path, ...]), ...].
    Loose pages between sections share an uncaptioned group; nested sections flatten into theirs."""
    def pages(items):
        for item in items:
            if isinstance(item, str): yield item
            elif "section" in item:
                if "href" in item: yield item["href"]
                yield from pages(item.get("contents", []))
            elif "href" in item: yield item["href"]
    groups = []
    for item in contents:
        if isinstance(item, dict) and "section" in item:
            groups.append((item["section"], list(pages([item]))))
        else:
            if not groups or groups[-1][0] is not None: groups.append((None, []))
            groups[-1][1].extend(pages([item]))
    return groups


def front_matter(nb, path):
    "The YAML nbdev puts in the first (raw) cell: title, description, output-file."
    cell = nb.cells[0] if nb.cells else None
    m = cell and cell.cell_type == "raw" and re.match(r"\s*---\n(.*?)\n---", cell.source, re.S)
    if not m: fail(f"{path} has no front matter cell; was it processed by nbdev?")
    return yaml.safe_load(m.group(1)) or {}


def directives(source):
    "Split nbdev/Quarto `#| key: value` lines off the top of a code cell: ({key: value}, rest of the source)."
    lines = source.splitlines()
    opts = {}
    while lines and lines[0].lstrip().startswith("#|"):
        key, _, value = lines.pop(0).lstrip()[2:].partition(":")
        opts[key.strip()] = value.strip().lower()
    return opts, "\n".join(lines)


def sphinx_notebook(nb, fm, fix_links):
    "Reshape a processed notebook for myst-nb, following what Quarto does with the same directives."
    head = f"# {fm.get('title', 'Untitled')}"
    if fm.get("description"): head += f"\n\n*{fm['description'].strip()}*"
    cells = [nbformat.v4.new_markdown_cell(head)]
    for cell in nb.cells[1:]:
        if cell.cell_type == "code":
            opts, cell.source = directives(cell.source)
            if "hide" in opts or opts.get("include") == "false": continue
            tags = cell.metadata.setdefault("tags", [])
            if opts.get("echo") == "false": tags.append("remove-input")  # show_doc: only its output shows
            if opts.get("output") == "false": tags.append("remove-output")
            for out in cell.get("outputs", []):
                if "text/markdown" in out.get("data", {}):
                    # show_doc's markdown opens with a `---` rule, which docutils only allows between sections.
                    md = re.sub(r"\A\s*---[ \t]*\n", "", out.data["text/markdown"])
                    out.data["text/markdown"] = fix_links(md)
        elif cell.cell_type == "markdown":
            cell.source = fix_links(cell.source)
        cells.append(cell)
    nb.cells = cells
    return nb


def stage(proc, nbs, src, site_url, listed):
    """Write every processed notebook that still has a source in nbs/ to `src`, named after its output file
    (00_env.ipynb -> env.ipynb, so the page is env.html as on the Quarto site). Returns {notebook: docname}.
    Notebooks not `listed` in the sidebar are still built, as on the Quarto site, but as orphan pages."""
    found = {}  # notebook path relative to nbs/ -> (notebook, front matter, docname)
    for p in sorted(proc.rglob("*.ipynb")):
        rel = p.relative_to(proc).as_posix()
        if not (nbs / rel).exists(): continue  # _proc/ keeps notebooks deleted since
        nb = nbformat.read(p, as_version=4)
        fm = front_matter(nb, p)
        html = posixpath.join(posixpath.dirname(rel), fm.get("output-file", Path(rel).stem + ".html"))
        found[rel] = (nb, fm, html.removesuffix(".html"))
    by_html = {doc + ".html": doc for _, _, doc in found.values()}

    for rel, (nb, fm, doc) in found.items():
        here = posixpath.dirname(doc)
        def fix_links(text):
            # Page links are written as Quarto's `page.html` (nbdev writes its own symbols' links as
            # absolute URLs of the published site); point them at the staged notebooks so Sphinx
            # resolves and checks them.
            def repl(m):
                url, anchor = m.group(1), m.group(2) or ""
                target = url[len(site_url):] if url.startswith(site_url) else posixpath.normpath(posixpath.join(here, url))
                if target not in by_html: return m.group(0)
                return f"]({posixpath.relpath(by_html[target], here or '.')}.ipynb{anchor})"
            return re.sub(r"\]\(([^()\s#]+\.html)(#[^()\s]*)?\)", repl, text)
        nb = sphinx_notebook(nb, fm, fix_links)
        # myst-nb reads notebook metadata as the page's front matter; orphans need no toctree entry.
        if rel not in listed and rel != "index.ipynb": nb.metadata["orphan"] = True
        out = src / f"{doc}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
    return {rel: doc for rel, (_, _, doc) in found.items()}


def toctrees(docs, groups):
    "sidebar.yml's order as hidden toctrees for the home page (the theme's sidebar shows them)."
    cells = []
    for caption, pages in groups:
        entries = ["self" if docs[p] == "index" else docs[p] for p in pages]
        opts = ":hidden:\n" + (f":caption: {caption}\n" if caption else "")
        cells.append(nbformat.v4.new_markdown_cell(f"```{{toctree}}\n{opts}\n" + "\n".join(entries) + "\n```"))
    return cells


def build(out, strict):
    try: proc, cfg = process_notebooks()
    except Exception:
        traceback.print_exc()
        fail("nbdev could not process the notebooks (see the error above)")
    sidebar = yaml.safe_load((cfg.nbs_path / "sidebar.yml").read_text())
    try: contents = sidebar["website"]["sidebar"]["contents"]
    except (TypeError, KeyError): fail("nbs/sidebar.yml has no website: sidebar: contents: list")
    if not isinstance(contents, list): fail("nbs/sidebar.yml: contents must be a list of pages (`auto` isn't supported)")
    groups = toc_groups(contents)
    listed = {p for _, pages in groups for p in pages}

    # Everything temporary lives in one folder next to `out`, so the finished site is moved into place
    # by a rename on the same file system; a failed build leaves the previous site untouched.
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".partial", dir=out.parent))
    try:
        src, site = work / "src", work / "site"
        docs = stage(proc, cfg.nbs_path, src, f"{cfg.doc_host}{cfg.doc_baseurl}/", listed)
        missing = sorted(listed - set(docs))
        if missing: fail(f"nbs/sidebar.yml lists {missing}, which are not notebooks in nbs/")
        if "index.ipynb" not in docs: fail("there is no nbs/index.ipynb for the home page")
        card = ROOT / "model_card.md"  # the pipeline model's card (`dvc repro`'s card stage): a page of its own, last
        if card.is_file():
            shutil.copy(card, src / "model_card.md")
            docs["model_card.md"] = "model_card"
            groups = [*groups, (None, ["model_card.md"])]
        index = src / "index.ipynb"
        nb = nbformat.read(index, as_version=4)
        nb.cells += toctrees(docs, groups)
        nbformat.write(nb, index)

        from sphinx.cmd.build import build_main
        args = ["-b", "html", "-q", "-c", str(DOCS), "-d", str(work / "doctrees"), str(src), str(site)]
        if strict: args[:0] = ["-W", "--keep-going"]  # warnings fail the build
        if build_main(args): fail("sphinx reported errors (see above)")

        if out.exists(): out.rename(work / "old")
        site.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return len(docs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "_site", help="output folder (default: _site/)")
    ap.add_argument("--strict", action="store_true", help="fail on Sphinx warnings")
    a = ap.parse_args()
    out = a.out.resolve()  # before the chdir below
    # The old site is deleted after the swap, so refuse to replace a folder that isn't one.
    if out.exists() and any(out.iterdir()) and not (out / ".buildinfo").exists():
        fail(f"{out} is not empty and is not a previous Sphinx build; refusing to replace it")
    os.chdir(ROOT)
    n = build(out, a.strict)
    print(f"docs: {n} pages written to {out}")


if __name__ == "__main__":
    main()
