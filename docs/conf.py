"""Sphinx configuration for the Quarto-free docs build (run it through `docs/build.py`, not sphinx-build:
the build script prepares the source folder this configuration is applied to)."""
from configparser import ConfigParser
from pathlib import Path

# Project facts come from nbdev's settings.ini so the two sites never disagree.
_cfg = ConfigParser()
_cfg.read(Path(__file__).resolve().parents[1] / "settings.ini", encoding="utf-8")
_s = _cfg["DEFAULT"]

project = _s["title"]
author = _s["author"]
copyright = _s["copyright"]
release = version = _s["version"]

extensions = ["myst_nb"]
templates_path = ["_templates"]  # relative to this folder (sphinx is run with -c docs/)

# The notebooks are shown with the outputs nbdev saved and processed; nothing is re-run.
nb_execution_mode = "off"
nb_merge_streams = True
# Give headings ids so `[text](#some-heading)` and `page.ipynb#heading` links resolve.
myst_heading_anchors = 3
# show_doc output starts at `###` under a page whose first section may be that very entry.
suppress_warnings = ["myst.header"]

html_theme = "pydata_sphinx_theme"
html_title = project
html_copy_source = False  # don't publish the staged notebooks next to the pages
html_show_sourcelink = False
# Without an icon of its own the browser asks for /favicon.ico, a 404 that shows as a console error.
html_favicon = "_static/favicon.svg"
# The theme's script logs an error when no colour mode is given; "auto" follows the reader's system.
html_context = {"default_mode": "auto"}
html_theme_options = {
    # Like nbdev's Quarto site: every page in a left sidebar, in sidebar.yml's order, on every page
    # (the theme's own sidebar only shows the current section, and the top bar has no room for sections).
    "navbar_center": [],
    "secondary_sidebar_items": ["page-toc"],
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": [],
    "icon_links": [{"name": "GitHub", "url": _s["git_url"], "icon": "fa-brands fa-github"}],
}
html_sidebars = {"**": ["site-nav"]}
