"""report.html in headless Chromium: loads from disk with no console message, no request,
and every image decoded (naturalWidth > 0).

No browser driver is needed: ``--dump-dom`` returns the DOM after the load event, and
``--enable-logging=stderr`` prints every console message as an ``INFO:CONSOLE`` line. The
report itself has no script; a test-only copy gets a small probe script that writes what it
saw (image sizes, resource timing entries, load errors, CSP violations) into the DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from matplotlib.image import imread

from conftest import require_tool
from normlab.reports import build as report_build
from normlab.reports import build_report
from normlab.reports.page import CSP

pytestmark = pytest.mark.browser

PROBE = """<script>
(() => {
  const seen = {errors: [], violations: []};
  addEventListener("error", e => seen.errors.push(String(e.target.src || e.message)), true);
  document.addEventListener("securitypolicyviolation", e => seen.violations.push(e.blockedURI));
  addEventListener("load", () => {
    seen.images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
    seen.resources = performance.getEntriesByType("resource").map(r => r.name);
    const out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify(seen);
    document.body.append(out);
  });
})();
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    require_tool(False, "headless Chromium (apt-get install chromium)")


def run_chromium(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{page.stem}-{len(extra)}"
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from test_reports import make_suite, synthetic_images

    root = make_suite(tmp_path_factory.mktemp("browser-suite"), unfinished=(("bn", 2),))
    with pytest.MonkeyPatch.context() as mp:  # synthetic folders: no checkpoints to test
        mp.setattr(report_build, "_test_batch_parts", lambda suite, figs: None)
        return build_report(root, images=synthetic_images)


def test_report_loads_with_no_console_message(report, tmp_path):
    result = run_chromium(tmp_path, report, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "</html>" in result.stdout and "normlab report" in result.stdout
    assert console_lines(result.stderr) == []


def test_every_image_decodes_and_nothing_is_requested(report, tmp_path):
    page = report.read_text()
    assert page.count(CSP) == 1
    probe_page = report.with_name("report-probe.html")  # same folder: same relative links
    allow_probe = CSP + "; script-src 'unsafe-inline'"
    probe_page.write_text(page.replace(CSP, allow_probe).replace("<head>", "<head>" + PROBE, 1))
    result = run_chromium(tmp_path, probe_page, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, "the probe did not run: " + result.stdout[-500:]
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(seen["images"]) == page.count("<img ")
    assert seen["images"], "no images"
    assert all(done and width > 0 and height > 0 for done, width, height in seen["images"])
    assert seen["resources"] == []  # data: URIs are not fetched; anything else would be
    assert seen["errors"] == [] and seen["violations"] == []
    assert console_lines(result.stderr) == []


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "report.png"
    result = run_chromium(tmp_path, report, "--hide-scrollbars", "--window-size=1280,3000",
                          f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = imread(shot)
    assert image.shape[:2] == (3000, 1280)
    assert image[..., :3].std() > 0.05
