"""The HTML report in headless Chromium: it loads from disk with no console errors and shows every plot.

Chromium comes from Debian (`chromium`). The fixture installs it when missing and this process is root with apt;
if it still cannot be had, the test fails in CI (CI=true) and is skipped elsewhere.
"""
import os
import re
import shutil
import subprocess

import pytest
from runfixtures import write_fixture_run

from attnbench.report import document as report

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")


def _find_chromium():
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="session")
def chromium():
    path = _find_chromium()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=1200)
        path = _find_chromium()
    if path is None:
        message = "chromium not found and could not be installed (apt-get install chromium as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def render(chromium, page, tmp_path):
    """Load ``page`` headless; returns (rendered DOM, chromium's stderr)."""
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                             page.as_uri()], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def body_attributes(dom):
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def console_messages(stderr):
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_report_renders_every_plot_without_errors(chromium, tmp_path):
    folder = write_fixture_run(tmp_path, approx=True)  # every section, the Pareto of approx_err included
    assert report.main([str(folder)]) == 0
    dom, stderr = render(chromium, folder / "report.html", tmp_path)
    attributes = body_attributes(dom)
    figures = len(list((folder / "report_files").glob("*.png")))
    assert attributes.get("data-plots") == attributes.get("data-plots-expected") == str(figures) == "15"  # 9 + 4 CP + 2 Pareto
    assert "data-js-errors" not in attributes
    assert console_messages(stderr) == []
    assert dom.count('<img class="plot"') == figures
    assert len(re.findall(r'<td class="st-(?:oom|crashed|timeout|error|wrong|unsupported)" title="', dom)) >= 7
    assert '<nav id="toc">' in dom and dom.count('<section id="') == 11  # cp and scaling included


def test_the_checks_catch_a_broken_page(chromium, tmp_path):
    """The same checks on a page with a script error and a broken image: they must fail."""
    folder = write_fixture_run(tmp_path, cp=False)
    assert report.main([str(folder)]) == 0
    page = (folder / "report.html").read_text()
    page = page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    page = page.replace("</body>", "<script>notDefined();</script></body>")
    broken = folder / "broken.html"
    broken.write_text(page)
    dom, stderr = render(chromium, broken, tmp_path)
    attributes = body_attributes(dom)
    assert attributes["data-js-errors"] == "1"
    assert int(attributes["data-plots"]) == int(attributes["data-plots-expected"]) - 1
    assert any("notDefined" in line for line in console_messages(stderr))
