"""The demo page in a real browser: headless Chromium from Debian (`chromium`, `chromium-driver`) driven by
selenium, against `python -m service` over the tiny fixture models. Skipped where Chromium is absent;
`.ci/run` installs it, so CI runs these."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import running_service
from onnx_fixtures import write_models_dir

from service.auth import new_key

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")]

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("page") / "exported"
    write_models_dir(folder)  # defaults: sample -> gan; cgan draws a chosen digit
    return folder


@pytest.fixture(scope="module")
def url(models_dir):
    with running_service(models_dir) as service:
        yield service.url


def chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture
def browser():
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message)


def width_of(driver, image_id: str) -> int:
    return driver.execute_script(f"return document.getElementById('{image_id}').naturalWidth")


def loaded(driver, image_id: str, width: int):
    """Wait until the image shows a picture `width` pixels wide (a new one: each draw swaps its blob)."""
    wait(driver, lambda d: width_of(d, image_id) == width, f"#{image_id} never showed a {width}-pixel picture")


def requested(driver, fragment: str) -> list[str]:
    return [url for url in driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)") if fragment in url]


def severe(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_first_grid_loads_with_its_seed_and_no_console_errors(browser, url):
    browser.get(url + "/")
    loaded(browser, "grid", 8 * 28 * 2)  # 16 images, 8 a row, scale 2
    seed = wait(browser, lambda d: d.find_element(By.ID, "shown-seed").text.strip("-"), "no seed shown")
    assert seed.isdigit()
    assert f"seed={seed}" not in browser.current_url  # a drawn seed is shown, not pinned
    assert requested(browser, "/sample?model=gan")
    assert severe(browser) == []


def test_clicking_7_draws_a_grid_of_sevens_and_the_address_keeps_it(browser, url):
    browser.get(url + "/?model=cgan&n=4&scale=3&seed=11")
    loaded(browser, "grid", 4 * 28 * 3)
    browser.find_element(By.CSS_SELECTOR, "button[data-digit='7']").click()
    wait(browser, lambda d: requested(d, "/generate?"), "no /generate request")
    (request,) = requested(browser, "/generate?")
    assert "digit=7" in request and "model=cgan" in request and "n=4" in request and "seed=11" in request
    loaded(browser, "grid", 4 * 28 * 3)
    wait(browser, lambda d: "digit=7" in d.current_url, "the address does not hold the digit")
    assert browser.find_element(By.ID, "shown-seed").text == "11"
    assert "digit 7" in browser.find_element(By.ID, "grid").get_attribute("alt")
    assert severe(browser) == []

    browser.get(browser.current_url)  # the link reproduces the picture
    loaded(browser, "grid", 4 * 28 * 3)
    assert browser.find_element(By.CSS_SELECTOR, "button[data-digit='7']").get_attribute("aria-pressed") == "true"


def test_the_interpolation_gif_loads(browser, url):
    browser.get(url + "/?model=cgan&scale=2")
    loaded(browser, "grid", 8 * 28 * 2)
    for field, value in (("walk-digit", "2"), ("walk-digit-to", "5"), ("steps", "6")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "#walk-format option[value='gif']").click()
    browser.find_element(By.ID, "walk-draw").click()
    loaded(browser, "walk-image", 28 * 2)  # one frame of the animation
    (request,) = requested(browser, "/interpolate?")
    assert "format=gif" in request and "digit=2" in request and "digit_to=5" in request
    assert "walk=1" in browser.current_url
    assert severe(browser) == []


def test_a_link_naming_no_option_of_a_choice_walks_with_its_default(browser, url):
    browser.get(url + "/?model=cgan&scale=2&from=2&to=5&steps=6&wformat=strip&walk=1")
    loaded(browser, "walk-image", 6 * 28 * 2)  # the strip, the default format: not a request for format=strip
    (request,) = requested(browser, "/interpolate?")
    assert "format=png" in request
    assert browser.find_element(By.ID, "error").is_displayed() is False
    assert severe(browser) == []


def test_an_api_error_is_shown_as_text(browser, url):
    browser.get(url + "/")
    loaded(browser, "grid", 8 * 28 * 2)
    browser.find_element(By.ID, "seed").send_keys("abc")
    browser.find_element(By.ID, "draw").click()
    error = wait(browser, expected_conditions.visibility_of_element_located((By.ID, "error")), "no error shown")
    assert "seed" in error.text and "integer" in error.text


def test_the_page_asks_for_a_key_when_the_server_needs_one(models_dir, tmp_path):
    key, line = new_key("browser")
    (tmp_path / "keys.txt").write_text(line + "\n")
    driver = chromium()
    try:
        with running_service(models_dir, api_keys_file=str(tmp_path / "keys.txt")) as service:
            url = service.url
            driver.get(url + "/")
            prompt = wait(driver, expected_conditions.alert_is_present(), "no key prompt")
            prompt.send_keys(key)
            prompt.accept()
            loaded(driver, "grid", 8 * 28 * 2)
            assert driver.execute_script("return sessionStorage.getItem('digitgen-api-key')") == key
            driver.refresh()  # the key is kept for the tab: no second prompt
            loaded(driver, "grid", 8 * 28 * 2)
    finally:
        driver.quit()


def test_the_api_docs_render_from_the_package_alone(browser, url):
    """/docs draws every operation with Swagger UI from /static: nothing is fetched from another origin
    (this machine reaches no CDN, so a page that needed one would stay blank)."""
    browser.get(url + "/docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5, "no operations drawn")
    assert "/sample" in browser.page_source and "/v2/models/{name}/infer" in browser.page_source
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url) for r in resources), resources
    assert severe(browser) == []
