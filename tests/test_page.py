"""The web page in a real headless browser (Debian's chromium through its chromedriver, by selenium): type a
prompt, Generate, see the progress and the live preview, see the image, download its PNG, reuse its settings,
cancel a run. A screenshot is kept in .cache/tests/artifacts/page.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from tests import models
from tests.serving import LiveServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed "
                                "(apt-get install chromium chromium-driver; `make setup` does it)")  # fmt: skip
ARTIFACTS = models.CACHE / "artifacts"


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--model", f"tiny={models.ov_dir('base')}", "--max-size", "512")
    yield s
    assert "Traceback" not in s.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})  # fmt: skip
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(condition, timeout: float = 120, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _set(driver, element_id: str, value) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def test_generate_progress_download_and_reuse(server, browser, downloads):
    d = browser
    d.get(server.url + "/")
    _wait(lambda: d.find_element("id", "status").text == "ready", 30, "the page to load its lists")
    assert [o.text for o in d.find_elements("css selector", "#model option")] == ["tiny"]
    _set(d, "prompt", "a lighthouse at dawn")
    for field, value in (("width", 256), ("height", 256), ("steps", 60), ("seed", 11)):
        _set(d, field, value)
    assert not d.find_element("id", "random_seed").is_selected()  # a typed seed is a fixed seed
    d.find_element("id", "generate").click()
    _wait(lambda: 0 < float(d.find_element("id", "bar").get_attribute("value")) < 1, 120, "progress")
    _wait(lambda: d.find_element("id", "preview").is_displayed(), 60, "the live preview")
    assert "ETA" in d.find_element("id", "eta").text
    card = _wait(lambda: d.find_elements("css selector", "#gallery .card"), 120, "the image")[0]
    assert d.find_element("id", "last_seed").text == "seed 11"
    img = card.find_element("css selector", "img")
    assert d.execute_script("return arguments[0].naturalWidth", img) == 256
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "page.png"))
    card.find_element("css selector", ".download").click()
    png = _wait(lambda: [p for p in downloads.glob("*.png")], 30, "the download")[0]
    _wait(lambda: not list(Path(downloads).glob("*.crdownload")), 30, "the download to finish")
    with Image.open(png) as im:
        assert im.size == (256, 256) and "Seed: 11" in im.info["parameters"] and "Steps: 60" in im.info["parameters"]
    _set(d, "prompt", "something else")
    _set(d, "steps", 3)
    card.find_element("css selector", ".reuse").click()  # "same settings"
    assert d.find_element("id", "prompt").get_attribute("value") == "a lighthouse at dawn"
    assert d.find_element("id", "steps").get_attribute("value") == "60"
    assert d.find_element("id", "seed").get_attribute("value") == "11"


def test_cancel_stops_the_job(server, browser):
    d = browser
    d.get(server.url + "/")
    _wait(lambda: d.find_element("id", "status").text == "ready", 30, "the page")
    _set(d, "prompt", "a long one")
    for field, value in (("width", 256), ("height", 256), ("steps", 150)):
        _set(d, field, value)
    before = server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="disconnected")
    d.find_element("id", "generate").click()
    _wait(lambda: 0 < float(d.find_element("id", "bar").get_attribute("value")), 120, "progress")
    d.find_element("id", "cancel").click()
    _wait(lambda: d.find_element("id", "error").text == "cancelled", 30, "the page to say cancelled")
    metric = lambda: server.metric("sdxl_requests_total", route="/sdapi/v1/txt2img", outcome="disconnected")  # noqa: E731
    _wait(lambda: metric() > before, 60, "the server to withdraw the job")
    _wait(lambda: server.call("/sdapi/v1/progress")[2]["state"]["job_count"] == 0, 60, "the worker to stop")
    assert d.find_element("id", "generate").is_enabled()
