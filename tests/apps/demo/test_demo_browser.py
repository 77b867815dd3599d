"""The demo page in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Loads the page, clicks and drags patches, uses the mask buttons, changes the budget, uploads an
image, edits rgb hue and semseg class, and checks after every step that the prediction images
changed and that the browser logged no console error; saves a screenshot.

CI (CI=true) must have the browser (``make test`` installs it): there the test fails instead of
skipping. ``MULTIMAE_DEMO_CHECKPOINT=runs/synthetic-tiny`` runs the page on a trained run instead
of the tiny random one; ``MULTIMAE_DEMO_SCREENSHOT=docs/img/demo.png`` copies the screenshot there.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1320,1180"]


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}: CI must run the browser test (make test installs chromium and chromium-driver)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not exe.exists():
            _missing(f"{exe} is missing (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))  # no driver download
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def page_server(engine):
    from multimae.apps.demo import engine_from_checkpoint
    from multimae.apps.demo.app import serving

    ckpt = os.environ.get("MULTIMAE_DEMO_CHECKPOINT")
    with serving(engine_from_checkpoint(ckpt) if ckpt else engine) as url:
        yield url


class Page:
    """Helpers over the page's canvases, images and status attributes."""

    def __init__(self, d) -> None:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        self.d, self.By, self.Actions = d, By, ActionChains

    def load(self, url: str) -> None:
        """Open ``url`` and wait (90 s at most) until the page says it is ready."""
        self.d.get(url)
        end = time.time() + 90
        while self.js("return document.body.dataset.ready") != "1" and time.time() < end:
            time.sleep(0.1)
        assert self.js("return document.body.dataset.ready") == "1", self.el("#error").text

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def el(self, css: str):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def count(self) -> int:
        return int(self.js("return document.body.dataset.predictions || '0'"))

    def visible(self) -> int:
        return int(self.js("return document.body.dataset.visible || '-1'"))

    def preds(self) -> dict[str, str]:
        return self.js("const o = {}; document.querySelectorAll('#outputs .card').forEach("
                       "c => o[c.id] = c.querySelector('img.pred').src); return o;")

    def grid(self) -> tuple[int, int]:
        return tuple(self.js("return S.info.grid"))

    def canvas_png(self, modality: str) -> str:
        return self.js(f"return document.querySelector('#input-{modality} canvas').toDataURL()")

    def wait_prediction(self, after: int, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.count() > after and self.js("return document.body.dataset.busy") == "0":
                return
            time.sleep(0.05)
        raise AssertionError(f"no new prediction within {timeout} s; error box: {self.el('#error').text!r}")

    def patch(self, modality: str, index: int) -> tuple[object, int, int]:
        """The canvas of a modality and the offset of a patch centre from the canvas centre."""
        cv = self.el(f"#input-{modality} canvas")
        gh, gw = self.grid()
        w, h = cv.size["width"], cv.size["height"]
        r, c = divmod(index, gw)
        return cv, int((c + 0.5) * w / gw - w / 2), int((r + 0.5) * h / gh - h / 2)

    def click_patch(self, modality: str, index: int) -> None:
        cv, dx, dy = self.patch(modality, index)
        self.Actions(self.d).move_to_element_with_offset(cv, dx, dy).click().perform()

    def drag_patches(self, modality: str, first: int, last: int) -> None:
        cv, x0, y0 = self.patch(modality, first)
        _, x1, y1 = self.patch(modality, last)
        a = self.Actions(self.d).move_to_element_with_offset(cv, x0, y0).click_and_hold()
        for k in range(1, 5):  # intermediate moves so that every patch on the way is crossed
            a = a.move_to_element_with_offset(cv, x0 + (x1 - x0) * k // 4, y0 + (y1 - y0) * k // 4)
        a.release().perform()

    def act(self, do, what: str) -> dict[str, str]:
        """Run an action that must end in a new prediction whose images differ from before."""
        before, n = self.preds(), self.count()
        do()
        self.wait_prediction(n)
        after = self.preds()
        assert after != before, f"{what}: the prediction images did not change"
        assert self.el("#error").get_attribute("hidden") is not None, f"{what}: {self.el('#error').text}"
        return after


def console_errors(d) -> list[dict]:
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE"]


def test_page_in_headless_chromium(driver, page_server, tmp_path):
    from selenium.webdriver.common.keys import Keys

    p = Page(driver)
    p.load(page_server)
    gh, gw = p.grid()
    n = gh * gw
    info = p.js("return S.info")
    assert p.visible() == min(info["budget"], 3 * n) and len(p.preds()) == len(info["outputs"])
    assert p.el("#folder-row").is_displayed() == ("folder" in info["sources"])
    assert not p.el("#caption-box").is_displayed()  # no text modality
    assert all(src.startswith("data:image/png") for src in p.preds().values())

    # clicking a patch toggles it; dragging sweeps a row; the buttons set whole modalities
    p.act(lambda: p.el("#show-all").click(), "show all")
    assert p.visible() == 3 * n
    rgb_before = p.canvas_png("rgb")
    p.act(lambda: p.click_patch("rgb", 0), "click an rgb patch")
    assert p.visible() == 3 * n - 1 and p.canvas_png("rgb") != rgb_before  # drawn greyed out
    p.act(lambda: p.click_patch("rgb", 0), "click it again")
    assert p.visible() == 3 * n
    p.act(lambda: p.drag_patches("depth", 0, gw - 1), "drag across the first depth row")
    assert p.visible() == 3 * n - gw
    p.act(lambda: p.el("#only-rgb").click(), "only rgb")
    assert p.visible() == n and p.js("return S.hidden.depth.size") == n
    p.act(lambda: p.el("#only-depth").click(), "only depth")
    assert p.visible() == n and p.js("return S.hidden.rgb.size") == n

    # the token budget: the slider (keyboard, as a user would) draws a new mask of that size
    budget = p.el("#budget")
    p.act(lambda: budget.send_keys(Keys.END), "budget to the maximum")
    assert p.visible() == 3 * n
    p.act(lambda: budget.send_keys(Keys.HOME), "budget to zero")
    assert p.visible() == 0
    p.act(lambda: p.js("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'))",
                       budget, n // 2), "budget set to half a modality")
    assert p.visible() == n // 2 and p.el("#budget-val").text == str(n // 2)
    p.act(lambda: p.el("#random-mask").click(), "a new random mask")
    assert p.visible() == n // 2
    p.act(lambda: p.el("#alpha").send_keys(Keys.HOME), "Dirichlet alpha to its minimum")
    assert p.visible() == n // 2 and p.el("#alpha-val").text == "0.10"
    p.act(lambda: p.js("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('change'))", p.el("#alpha")),
          "Dirichlet alpha back to 1")
    assert p.el("#alpha-val").text == "1.00"

    # an uploaded image: the other modalities are the model's predictions, labelled as such
    img = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    p.act(lambda: p.el("#upload").send_keys(str(img)), "upload an image")
    assert "uploaded image" in p.el("#sample-title").text
    assert "predicted from rgb" in p.el("#input-depth .origin").text
    assert "not ground truth" in p.el("#output-depth .target-label").text

    # back to a synthetic scene, everything visible; edit rgb hue and semseg class of a region
    p.act(lambda: p.el("#next-scene").click(), "next synthetic scene")
    assert p.el("#input-depth .origin").text == "(true)"
    p.act(lambda: p.el("#show-all").click(), "show all")
    p.el("input[name=mode][value=edit]").click()
    p.drag_patches("rgb", n - gw, n - 1)  # bottom row
    p.click_patch("rgb", 0)
    assert p.js("return S.selected.rgb.size") == gw + 1 and p.visible() == 3 * n  # selecting masks nothing
    rgb_before = p.canvas_png("rgb")
    p.act(lambda: p.el("#apply-hue").click(), "hue edit")
    assert p.canvas_png("rgb") != rgb_before and "edited" in p.el("#input-rgb .origin").text
    p.drag_patches("semseg", 0, gw - 1)
    driver.find_element(p.By.CSS_SELECTOR, "#class-select option[value='3']").click()
    title = p.el("#sample-title").text
    p.act(lambda: p.el("#apply-class").click(), "semseg class edit")
    assert "edited" in p.el("#input-semseg .origin").text
    assert p.el("#sample-title").text == title  # the title does not grow with every edit
    p.el("#clear-selection").click()
    p.el("input[name=mode][value=mask]").click()
    p.act(lambda: p.click_patch("depth", n // 2), "mask a depth patch after the edits")
    assert p.visible() == 3 * n - 1
    p.act(lambda: p.el("#only-rgb").click(), "depth and semseg from the edited rgb alone")
    p.act(lambda: p.el("#random-mask").click(), "a random mask of the edited sample")
    assert p.visible() == n // 2

    assert console_errors(driver) == []
    shot = tmp_path / "demo.png"
    driver.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and np.asarray(im.convert("L")).std() > 10  # not a blank page
    if os.environ.get("MULTIMAE_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MULTIMAE_DEMO_SCREENSHOT"])

    # a bad upload is reported on the page; the only console entry is the failed request itself
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    p.el("#upload").send_keys(str(bad))
    end = time.time() + 30
    while p.el("#error").get_attribute("hidden") is not None and time.time() < end:
        time.sleep(0.05)
    assert "not an image" in p.el("#error").text
    assert all("415" in e["message"] for e in console_errors(driver))


@pytest.fixture(scope="module")
def m3ae_server(m3ae_engine):
    from multimae.apps.demo.app import serving

    with serving(m3ae_engine) as url:
        yield url


def test_m3ae_caption_is_shown_editable_and_predicted(driver, m3ae_server):
    p = Page(driver)
    p.load(m3ae_server)
    assert not p.el("#folder-row").is_displayed()  # no folder dataset: the row is hidden
    assert p.el("#caption-box").is_displayed() and p.el("#caption-output").is_displayed()

    def words(css: str) -> list[str]:
        return [w.text for w in driver.find_elements(p.By.CSS_SELECTOR, css)]

    caption = p.js("return S.sample.text.caption")
    assert len(words("#caption-words .word")) > 5 and p.el("#caption-text").get_attribute("value") == caption
    assert len(words("#caption-pred .word")) == len(words("#caption-words .word"))
    masked = len(words("#caption-words .word.masked"))
    assert masked > 0 and len(words("#caption-pred .word.predicted")) == masked  # the run's ratio hides words

    # clicking a visible word hides it: it is predicted now
    n = p.count()
    driver.find_element(p.By.CSS_SELECTOR, "#caption-words .word:not(.masked)").click()
    p.wait_prediction(n)
    assert len(words("#caption-words .word.masked")) == masked + 1
    assert len(words("#caption-pred .word.predicted")) == masked + 1

    # the caption is editable: a new caption is tokenised, shown and predicted from
    base = p.el("#sample-title").text
    for text in ("a red cone on the left", "a blue box in the middle"):
        n = p.count()
        box = p.el("#caption-text")
        box.clear()
        box.send_keys(text)
        p.el("#set-caption").click()
        p.wait_prediction(n)
        assert " ".join(words("#caption-words .word")) == text
        assert p.el("#caption-origin").text == "(edited)"
        assert len(words("#caption-pred .word")) == len(text.split())
        assert p.el("#sample-title").text == base + " (edited)"  # the same after every edit
    n = p.count()
    p.el(f"#only-{p.js('return S.info.text.name')}").click()  # every rgb patch hidden
    p.wait_prediction(n)
    assert p.visible() == 0 and not words("#caption-words .word.masked")
    assert p.el("#error").get_attribute("hidden") is not None, p.el("#error").text
    assert console_errors(driver) == []
