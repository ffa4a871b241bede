"""The course as a website, checked as a person would look at it: the book is built from the
notebooks' committed outputs (`jupyter-book build`, nothing executed), served on localhost and
opened in headless Chromium. Every notebook page exists, its figures load, the sidebar reaches
all six notebooks in course order, and the browser's console shows no error. One screenshot per
page goes to _build/screenshots/ for a human to look at.

Needs requirements-docs.txt and a Chromium (Debian: apt-get install chromium); skipped, saying
which is missing, where either is absent.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import REPO

NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SITE = REPO / "_build" / "html"
SHOTS = REPO / "_build" / "screenshots"
BUILD = ["jupyter-book", "build", ".", "--config", "book/_config.yml", "--toc", "book/_toc.yml"]   # README's command


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def site():
    pytest.importorskip("jupyter_book", reason="the site needs requirements-docs.txt: pip install -r requirements-docs.txt")
    shutil.rmtree(SITE, ignore_errors=True)        # pages must come from this build, not an earlier one
    exe = shutil.which("jupyter-book", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    build = subprocess.run([exe, *BUILD[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return SITE


@pytest.fixture(scope="module")
def browser(site):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright "
                                   "(requirements-docs.txt)")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium to look at the site with: apt-get install chromium (or set CHROMIUM)")
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_api.sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chrome, f"http://127.0.0.1:{server.server_address[1]}/"
        chrome.close()
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_build_renders_every_notebook_without_executing_it(site):
    for name in NOTEBOOKS:
        assert (site / "notebooks" / f"{name}.html").is_file(), name
    assert "execute_notebooks: \"off\"" in (REPO / "book" / "_config.yml").read_text()   # nothing is executed
    page = (site / "notebooks" / "04_training.html").read_text()
    assert "89.82" in page and "<img" in page                             # committed outputs, figures


def test_every_page_in_a_browser(browser):
    chrome, base = browser
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = chrome.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    local = urlparse(base).netloc

    def on_console(message):                   # external resources (the Colab badge) cannot load offline
        if message.type == "error" and urlparse(message.location.get("url") or base).netloc == local:
            errors.append(f"{page.url}: {message.text}")
    page.on("console", on_console)
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))
    for name in ["README", *(f"notebooks/{n}" for n in NOTEBOOKS)]:
        response = page.goto(base + f"{name}.html", wait_until="load")
        assert response.ok, name
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.src, e.complete && e.naturalWidth > 0])")
        broken = [src for src, ok in images if not ok and urlparse(src).netloc == local]
        assert not broken, f"{name}: broken images {broken[:3]}"
        if name.startswith("notebooks/"):
            assert sum(urlparse(src).netloc == local for src, _ in images) >= 1, f"{name} shows no figure"
        nav = page.eval_on_selector_all("nav.bd-links a", "els => els.map(e => e.href)")
        assert [Path(urlparse(h).path).stem for h in nav] == ["README", *NOTEBOOKS], nav   # in course order
        figures = page.locator("img[src*='_images/']")
        if figures.count():
            figures.first.scroll_into_view_if_needed()          # the screenshot shows a rendered figure
        page.screenshot(path=str(SHOTS / f"{Path(name).name}.png"))
    assert not errors, errors


def test_the_readme_links_the_site_of_the_repository():
    repo = re.search(r'^Repository = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    owner, name = urlparse(repo).path.strip("/").split("/")
    assert f"https://{owner}.github.io/{name}/" in (REPO / "README.md").read_text()
    assert repo in (REPO / "book" / "_config.yml").read_text()
