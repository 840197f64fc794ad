"""The page at `/`: in-process checks of the HTML, its assets and the open paths, then a real
`tagserve serve` driven in headless Chromium (selenium + chromedriver; skipped without them).

`TAGSERVE_UPDATE_SCREENSHOT=1 pytest -m browser tests/test_page.py` runs the browser test on the
bundled model instead of the tiny random checkpoint and writes its screenshot to docs/page.png.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tagserve.bundled import DEFAULT_MODEL
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.factory import EngineArgs
from tagserve.server.app import build_app
from tagserve.server.routes.page import STATIC_DIR
from tagserve.server.settings import ServerSettings

from server_util import REPO, serve_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "page-test-key"
MODEL_NAME = "tiny-bert-ner"
UPDATE_SCREENSHOT = os.environ.get("TAGSERVE_UPDATE_SCREENSHOT") == "1"
SENTENCE = "Alice Smith moved from Berlin to Paris in 1999 to work for Airbus."
THRESHOLD = 0.5
WINDOW = (1280, 900)
WAIT = 30.0


class _Elements(HTMLParser):
    """Attributes of every element, by id, and every tag's attributes in order."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if attributes.get("id"):
            self.by_id[str(attributes["id"])] = {"tag": tag, **attributes}


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(make_checkpoint("bert"))))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine) -> Iterator[TestClient]:
    app = build_app(engine, ServerSettings(served_model_names=["bert"], api_keys=[API_KEY]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_page_has_its_controls(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page = _Elements()
    page.feed(response.text)
    for element_id, tag in [("text", "textarea"), ("strategy", "select"), ("bio", "select"),
                            ("threshold", "input"),
                            ("tag", "button"), ("example", "button"), ("api-key", "input"),
                            ("legend", "ul"), ("highlighted", "div"), ("tooltip", "div"),
                            ("redact-mode", "select"), ("redacted", "div"), ("error", "div"),
                            ("model-name", "output")]:
        assert page.by_id[element_id]["tag"] == tag, element_id
    assert page.by_id["api-key"]["type"] == "password"
    assert page.by_id["error"]["role"] == "alert"
    assert page.by_id["tooltip"]["role"] == "tooltip"
    options = [attrs["value"] for tag, attrs in page.tags if tag == "option"]
    assert options == ["simple", "first", "average", "max", "none", "", "repair", "viterbi",
                       "replace", "mask", "hash"]
    assets = {attrs.get("src") or attrs.get("href") for tag, attrs in page.tags
              if tag in ("script", "link")}
    assert assets == {"static/app.js", "static/style.css", "data:,"}
    assert client.head("/").status_code == 200


def test_assets_are_served_and_self_contained(client):
    for name, types in [("app.js", ("text/javascript", "application/javascript")),
                        ("style.css", ("text/css",)), ("index.html", ("text/html",))]:
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].split(";")[0] in types, name
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (STATIC_DIR / name).read_bytes()
        # No CDN or web font: the project's machines have no internet.
        assert "http://" not in response.text and "https://" not in response.text, name
        assert "@import" not in response.text and "url(" not in response.text, name
    script = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/..%2F..%2Fserver%2Fapp.py").status_code == 404


def test_page_is_open_and_the_api_is_not(client):
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    body = {"input": SENTENCE, "aggregation_strategy": "first", "return_tokens": True}
    assert client.get("/v1/models").status_code == 401
    assert client.post("/v1/ner", json=body).status_code == 401
    assert client.get("/static/../v1/models").status_code != 200
    assert client.get("/v1/models", headers=_auth()).status_code == 200


def test_answers_have_what_the_page_reads(client):
    """The fields app.js uses, from the real routes (their own tests check the values)."""
    ner = client.post("/v1/ner", headers=_auth(), json={
        "input": SENTENCE, "aggregation_strategy": "none", "threshold": None,
        "return_tokens": True})
    assert ner.status_code == 200, ner.text
    [item] = ner.json()["data"]
    assert item["entities"] and all({"entity", "score", "start", "end"} <= set(e)
                                    for e in item["entities"])
    assert all({"token", "start", "end", "label", "score"} <= set(t) for t in item["tokens"])
    redaction = client.post("/v1/redact", headers=_auth(), json={
        "input": SENTENCE, "mode": "mask", "threshold": THRESHOLD,
        "aggregation_strategy": "first"})
    assert redaction.status_code == 200, redaction.text
    [item] = redaction.json()["data"]
    assert isinstance(item["text"], str)
    assert all({"entity_group", "start", "end", "replacement"} <= set(e)
               for e in item["entities"])
    bad = client.post("/v1/ner", headers=_auth(), json={"input": SENTENCE,
                                                         "aggregation_strategy": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


# ---- the page in headless Chromium, against `tagserve serve` ----------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """Headless Chromium through chromedriver; skips when either (or selenium) is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{binary} is missing (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        # The viewport itself, whatever the window decorations: screenshots are 1280x900.
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.browser
def test_page_in_headless_chromium(browser, make_checkpoint, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # The docs' screenshot shows real entities: the bundled model, under its own name.
    # A model that recommends a decoding (config.json's "tagserve_ner_decoding"): the pickers'
    # defaults once the page can read it.
    decoding = {"aggregation_strategy": "average", "bio": "viterbi", "threshold": 0.25}
    ckpt, model_name = ((DEFAULT_MODEL, DEFAULT_MODEL.name) if UPDATE_SCREENSHOT
                        else (make_checkpoint("bert", tagserve_ner_decoding=decoding),
                              MODEL_NAME))
    decoding = json.loads((ckpt / "config.json").read_text()).get(
        "tagserve_ner_decoding", {"aggregation_strategy": "simple", "bio": None})
    id2label = json.loads((ckpt / "config.json").read_text())["id2label"].values()
    entity_labels = set(id2label) | {label.split("-", 1)[-1] for label in id2label}
    driver = browser
    wait = WebDriverWait(driver, WAIT)
    find = driver.find_element

    def text_of(element_id: str) -> str:
        return find(By.ID, element_id).get_property("textContent")

    with serve_process(ckpt, tmp_path / "server.log", "--api-key", API_KEY,
                       "--served-model-name", model_name) as url:
        driver.get(f"{url}/")
        assert driver.title == "tagserve"
        wait.until(lambda _: text_of("model-name") == "(API key needed)")
        assert find(By.ID, "strategy").get_property("value") == "simple"  # not read yet
        find(By.ID, "example").click()
        assert find(By.ID, "text").get_property("value")

        # Without the key: the server's 401 is shown to the user.
        find(By.ID, "tag").click()
        wait.until(lambda _: find(By.ID, "error").is_displayed())
        assert "401: Unauthorized" in text_of("error")

        find(By.CSS_SELECTOR, ".key summary").click()
        find(By.ID, "api-key").send_keys(API_KEY, Keys.TAB)
        wait.until(lambda _: text_of("model-name") == model_name)
        wait.until(lambda _: find(By.ID, "strategy").get_property("value")
                   == decoding["aggregation_strategy"])
        assert find(By.ID, "bio").get_property("value") == (decoding["bio"] or "")
        shown = find(By.ID, "threshold").get_property("value")
        assert (float(shown) if shown else None) == decoding.get("threshold")
        find(By.CSS_SELECTOR, ".key summary").click()

        text_box = find(By.ID, "text")
        text_box.clear()
        text_box.send_keys(SENTENCE)
        Select(find(By.ID, "strategy")).select_by_value("first")
        find(By.ID, "threshold").clear()
        find(By.ID, "threshold").send_keys(str(THRESHOLD))
        find(By.ID, "tag").click()
        marks = wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "mark.ent"))
        assert not find(By.ID, "error").is_displayed(), text_of("error")
        for mark in marks:
            start, end = int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))
            shown = mark.find_element(By.CLASS_NAME, "ent-text").get_property("textContent")
            assert shown and shown in SENTENCE and shown == SENTENCE[start:end]
            assert mark.get_attribute("data-label") in entity_labels
            assert float(mark.get_attribute("data-score")) >= THRESHOLD
        legend = {item.find_element(By.CLASS_NAME, "legend-label").text
                  for item in driver.find_elements(By.CSS_SELECTOR, "#legend li")}
        assert legend == {mark.get_attribute("data-label") for mark in marks}

        # Hovering a token shows its string, label and probability.
        token = marks[0].find_element(By.CLASS_NAME, "tok")
        ActionChains(driver).move_to_element(token).perform()
        tooltip = find(By.ID, "tooltip")
        wait.until(lambda _: tooltip.is_displayed())
        fields = dict(zip([dt.text for dt in tooltip.find_elements(By.TAG_NAME, "dt")],
                          [dd.text for dd in tooltip.find_elements(By.TAG_NAME, "dd")],
                          strict=True))
        assert fields["token"].removeprefix("##") == token.get_property("textContent")
        assert fields["label"] in id2label
        assert 0.0 <= float(fields["probability"]) <= 1.0

        # Keyboard: the arrow keys move between tokens and the tooltip follows.
        token.send_keys(Keys.ARROW_RIGHT)
        focused = driver.switch_to.active_element
        assert "tok" in focused.get_attribute("class").split() and focused != token
        assert tooltip.is_displayed() and text_of("tooltip") != ""

        # The redaction preview, then another mode.
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#redacted .text-body"))
        redacted = text_of("redacted")
        assert redacted and redacted != SENTENCE
        Select(find(By.ID, "redact-mode")).select_by_value("mask")
        wait.until(lambda _: text_of("redacted") not in (redacted, ""))
        assert "*" in text_of("redacted")
        Select(find(By.ID, "redact-mode")).select_by_value("replace")
        wait.until(lambda _: text_of("redacted") == redacted)

        errors = [entry["message"] for entry in driver.get_log("browser")
                  if entry["level"] == "SEVERE" and "401" not in entry["message"]]
        assert not errors, errors

        # The docs' screenshot, with a token hovered again (the mouse leaves it first).
        driver.execute_script("document.activeElement.blur()")
        ActionChains(driver).move_to_element(find(By.TAG_NAME, "h1")).move_to_element(token) \
            .perform()
        wait.until(lambda _: tooltip.is_displayed())
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        assert _png_size(shot) == WINDOW
        if UPDATE_SCREENSHOT:
            shutil.copyfile(shot, REPO / "docs" / "page.png")
