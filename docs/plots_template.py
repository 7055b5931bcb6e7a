"""Write `.dvc/plots/offline.html`, the page `dvc plots show` fills (`.dvc/config`: `plots.html_template`).

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so without internet it is blank. This template
inlines them instead, as the single script that vl-convert-python (the Vega project's converter) bundles, and
leaves out DVC's `{scripts}` placeholder, where the CDN tags would go. Run it again after upgrading
vl-convert-python:

    uv run python docs/plots_template.py
"""
from pathlib import Path

import vl_convert

OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite 5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>cifarlab: DVC plots</title>
  <!-- Vega, Vega-Lite and vega-embed (BSD-3-Clause licences), bundled by vl-convert-python __VERSION__ (Vega-Lite __VL__) -->
  <script>__BUNDLE__</script>
  <style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def template():
    "The page, with the bundle inlined (DVC fills `{refresh_tag}` and `{plot_divs}`)."
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")  # keep the element whole
    return PAGE.replace("__VERSION__", vl_convert.__version__).replace("__VL__", VEGA_LITE).replace("__BUNDLE__", bundle)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(template(), encoding="utf8")
    print(f"{OUT}: {OUT.stat().st_size / 1e6:.2f} MB")
