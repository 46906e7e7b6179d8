"""The HTML report renders in a real browser: headless Chromium's screenshot shows the embedded heatmaps."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import run_cli
from lsn_exp import webpage
from lsn_exp.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page, out):
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1300,2600", page.as_uri()], check=True,
                   capture_output=True, timeout=180)
    return out


def coloured_share(png) -> float:
    """Share of strongly coloured pixels (a heatmap's colour map; text and tables are grey on white)."""
    from PIL import Image

    pixels = list(Image.open(png).convert("HSV").getdata())
    return sum(s > 100 and v > 60 for _, s, v in pixels) / len(pixels)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; .ci/run installs it)")
def test_the_html_report_renders_its_matrix_images_in_chromium(tmp_path):
    sweep = tmp_path / "s"
    result = run_cli("-m", "model=tiny", "lang=fr,ja", "factor=2,pmax", "stage=lss_matrix", "logger=none",
                     "identify.languages=[en,fr,ja]", "identify.max_tokens=300", "lss.n_facts=4",
                     "lss.sources=[en,fr,ja]", "lss.targets=[en,fr,ja]", "lss.bootstrap=0",
                     f"hydra.sweep.dir={sweep}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = build_report(sweep)
    page = report.with_suffix(".html")
    text_only = tmp_path / "text_only.html"  # the same page without its figures
    text_only.write_text(webpage.render("\n".join(line for line in report.read_text().splitlines()
                                                  if not line.startswith("![")), sweep, "text only"))
    with_figures = coloured_share(screenshot(page, tmp_path / "page.png"))
    without = coloured_share(screenshot(text_only, tmp_path / "text.png"))
    assert with_figures > 0.02 and with_figures > 10 * max(without, 1e-4), (with_figures, without)
