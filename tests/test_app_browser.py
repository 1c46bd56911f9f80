"""The Gradio app in a real browser: Playwright drives Debian's Chromium against `serve` on 127.0.0.1.

Inserts a network from its card, generates, and checks the image and the infotext on the page; a bad tag's
warning shows next to the image; the weight plot draws a hold schedule as steps and a line per block group,
also when the set of series changes from one image to the next. The page's screenshot is kept in
tests/_artifacts/app.png.
Needs `/usr/bin/chromium` (or $LYCORIS_CHROMIUM) and the `playwright` Python package (no browser download:
.ci/app-setup installs both). Skipped when either is missing, unless LYCORIS_REQUIRE_BROWSER=1.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "_artifacts"
CHROMIUM = os.environ.get("LYCORIS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
START_TIMEOUT_S = 180
GENERATE_TIMEOUT_MS = 120_000


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (.ci/app-setup)"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (.ci/app-setup: apt-get install chromium)"
    return ""


if _missing():
    if os.environ.get("LYCORIS_REQUIRE_BROWSER") == "1":
        raise RuntimeError(_missing())
    pytest.skip(_missing(), allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("app_data")
    port = _free_port()
    log = (tmp_path_factory.mktemp("log") / "serve.log").open("w+")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "lycoris_app", "serve", "--port", str(port), "--data-dir", str(data)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            log.seek(0)
            if "Running on local URL" in log.read():
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not start (rc {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 1400})
        pg.goto(server[0])
        yield pg
        browser.close()


def test_insert_from_card_generate_and_check_the_page(server, page):
    from PIL import Image

    from lib_lycoris.files import addnet_hash

    url, data = server
    expect(page.locator("#default-model-note")).to_contain_text("noise-like images")
    card = page.locator("#card-moss_loha")
    expect(card).to_contain_text("SD1")
    expect(card).to_contain_text("mossy")
    expect(card.locator("img")).to_have_count(1)

    prompt = page.locator("#prompt textarea")
    prompt.fill("a lighthouse at dusk")
    page.locator("#insert-moss_loha").click()
    expect(prompt).to_have_value("a lighthouse at dusk <lora:moss_loha:1>")

    page.locator("#generate").click()
    short = addnet_hash(data / "networks" / "moss_loha.safetensors")[:12]
    info = page.locator("#infotext textarea")
    expect(info).to_have_value(re.compile(re.escape(f'Lora hashes: "moss_loha: {short}"')), timeout=GENERATE_TIMEOUT_MS)
    text = info.input_value()
    assert text.startswith("a lighthouse at dusk <lora:moss_loha:1>\n")
    assert "Steps: 4" in text and "Size: 64x64" in text
    expect(page.locator("#warnings textarea")).to_have_value("no warnings")

    img = page.locator("#result-image img")
    expect(img).to_have_count(1)
    page.wait_for_function("document.querySelector('#result-image img').naturalWidth > 0")
    assert page.evaluate("document.querySelector('#result-image img').naturalWidth") == 64
    src = img.get_attribute("src")
    body = page.request.get(src if src.startswith("http") else url.rstrip("/") + "/" + src.lstrip("/")).body()
    png = Image.open(io.BytesIO(body))
    assert png.size == (64, 64)
    assert png.text.get("parameters") == text      # the PNG served is the one with the infotext
    expect(page.locator("#weights-plot")).to_be_visible()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)


def test_bad_tag_warns_on_the_page(page):
    page.locator("#prompt textarea").fill("a lighthouse <lora:no_such_network:1>")
    page.locator("#generate").click()
    expect(page.locator("#warnings textarea")).to_have_value(re.compile("no_such_network.*skipped|skipped.*no_such_network|no network called 'no_such_network'"),
                                                             timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#infotext textarea")).to_have_value(re.compile(r"^a lighthouse <lora:no_such_network:1>\n"))
    page.screenshot(path=str(ARTIFACTS / "app-warning.png"), full_page=True)


def _line(page, series: str):
    """The plot's SVG path of one series (Vega writes `series: <name>` last in its aria-label)."""
    return page.locator(f'#weights-plot .plot_marks path[aria-label$="series: {series}"]')


def test_weight_plot_draws_steps_and_block_lines(page):
    prompt = "a lighthouse <lora:moss_loha:0.2@1,1@3:in=0:out=1.2>"
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    expect(page.locator("#infotext textarea")).to_have_value(re.compile("^" + re.escape(prompt) + "\n"),
                                                             timeout=GENERATE_TIMEOUT_MS)
    # The series differ from the previous image's: every one must be drawn, with a color (a stroke).
    for series in ("te", "unet", "unet in", "unet mid", "unet out"):
        expect(_line(page, f"moss_loha {series}")).to_have_attribute("stroke", re.compile("."), timeout=30_000)
        expect(page.locator("#weights-plot")).to_contain_text(f"moss_loha {series}")      # the legend
    # Hold: flat, then a vertical jump (two points at the same x) where the keyframe at step 3 starts.
    d = _line(page, "moss_loha te").get_attribute("d")
    points = [(float(x), float(y)) for x, y in re.findall(r"[ML]([-\d.e]+),([-\d.e]+)", d)]
    assert any(a[0] == b[0] and a[1] != b[1] for a, b in zip(points, points[1:])), d
    assert not any(a[0] != b[0] and a[1] != b[1] for a, b in zip(points, points[1:])), f"a ramp in {d}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#weights-plot").screenshot(path=str(ARTIFACTS / "weights-plot.png"))


def test_export_lora_from_the_page(server, page):
    """Export LoRA: a bad name is one message; then the prompt's two tags become one file, its card appears, its tag
    replaces them in the prompt, and generating with it names the export in `Lora hashes`."""
    from lib_lycoris.files import addnet_hash

    url, data = server
    prompt = page.locator("#prompt textarea")
    prompt.fill("a lighthouse <lora:inkwash_lora:0.8> <lora:moss_loha:0.5>")
    page.locator("#export-panel > button.label-wrap").click()
    result = page.locator("#export-result")
    page.locator("#export-name textarea, #export-name input").first.fill("../escape")
    page.locator("#export-button").click()
    expect(result).to_contain_text("Not exported:", timeout=GENERATE_TIMEOUT_MS)
    expect(result).to_contain_text("not a plain file name")
    expect(page.locator("#export-use")).to_be_hidden()

    page.locator("#export-mode").get_by_text("exact", exact=True).click()
    expect(page.locator("#export-value input")).to_be_disabled()
    page.locator("#export-name textarea, #export-name input").first.fill("page mix")
    page.locator("#export-button").click()
    tag = "<lora:exports/page mix:1>"
    expect(result).to_contain_text(tag, timeout=GENERATE_TIMEOUT_MS)
    expect(result).to_contain_text("retained energy 1.000000")
    path = data / "networks" / "exports" / "page mix.safetensors"
    expect(result).to_contain_text(str(path))
    assert path.is_file()
    expect(page.locator("#card-exports-page-mix")).to_contain_text("SD1", timeout=30_000)   # the new card

    page.locator("#export-use").click()
    expect(prompt).to_have_value(f"a lighthouse {tag}")
    page.locator("#generate").click()
    short = addnet_hash(path)[:12]
    hashes = re.compile(re.escape(f'Lora hashes: "exports/page mix: {short}"'))
    expect(page.locator("#infotext textarea")).to_have_value(hashes, timeout=GENERATE_TIMEOUT_MS)
    expect(page.locator("#warnings textarea")).to_have_value("no warnings")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-export.png"), full_page=True)
