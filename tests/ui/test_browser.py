"""`scenebreak ui` in a real browser (headless Chromium driven by Selenium): open the
page with its token, click on the photo, see the mask, save it and find on disk what
`scenebreak mask --point` gives for the same click, learn a tiny scene and see its
progress finish, generate an image and see it on the page. Skipped, saying why, only
where no browser can run (CI installs one: .ci/run)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pageclient import serve, ui  # noqa: F401 (fixtures)
from test_api import cli_masks, file_array

WAIT = 120  # seconds; each step takes a second or two on the tiny models


@pytest.fixture
def browser(monkeypatch):
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[test]'")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium or chromedriver here: apt-get install chromium chromium-driver (Debian)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield browser
    browser.quit()


def wait_for(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    def check(driver):
        error = driver.find_element("id", "error")
        assert not error.is_displayed(), f"the page shows an error while waiting for {what}: {error.text}"
        return condition(driver)

    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(check, f"waited {WAIT} s for {what}")


def test_click_save_learn_and_generate_in_a_browser(browser, ui, scene_files, tiny_segmentation):
    from selenium.webdriver.common.action_chains import ActionChains

    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    browser.get(ui.server.url)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('canvas').width") == 96, "the photo")

    # A click at the photo's pixel (20, 20) (the canvas shows it at its own size, or scaled).
    canvas = by_id("canvas")
    left, top, width, height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", canvas)
    ActionChains(browser).move_to_element_with_offset(canvas, round((20.5 - 48) * width / 96),
                                                      round((20.5 - 40) * height / 80)).click().perform()
    wait_for(browser, lambda d: canvas.get_attribute("data-masks") == "1", "the mask overlay")
    # The overlay is drawn: some pixels of the canvas are no longer the photo's.
    tinted = browser.execute_script(
        "const c = arguments[0]; const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return [...p].filter((v, i) => i % 4 == 1 && v != 230 && v != 30).length;", canvas)
    assert tinted > 0
    facts = browser.find_element("css selector", "#objects li .facts").text
    x, y = map(int, re.search(r"--point (\d+),(\d+)", facts).groups())  # the click as the page took it
    assert abs(x - 20) <= 1 and abs(y - 20) <= 1

    # A second object from the keyboard alone: the photo takes focus, arrows move, Enter clicks.
    from selenium.webdriver.common.keys import Keys

    by_id("add").click()
    canvas.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_DOWN, Keys.ENTER)
    wait_for(browser, lambda d: canvas.get_attribute("data-masks") == "2", "the keyboard's mask")
    assert len(browser.find_elements("css selector", "#objects li")) == 2

    by_id("save").click()
    wait_for(browser, lambda d: d.find_elements("css selector", "#saved li"), "the saved masks")
    saved = browser.find_elements("css selector", "#saved li")[0].text
    assert saved.endswith("photo.mask1.png")
    expected = cli_masks(scene_files["image"], scene_files["image"].parent / "cli", tiny_segmentation, "--point", f"{x},{y}")[0]
    assert np.array_equal(file_array(saved), expected)

    # A tiny learn: its progress streams in and finishes.
    browser.execute_script("document.querySelector('#learn-settings').parentElement.open = true")
    for name, value in (("steps1", "2"), ("steps2", "1")):
        by_id(f"learn-settings-{name}").send_keys(value)
    by_id("learn-settings-prior").click()  # --no-prior
    by_id("scene-name").send_keys("clicked")
    by_id("learn").click()
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-job") == "done"
             and "Learned" in by_id("learned").text, "learn to finish")
    log = by_id("log").text
    assert "phase 1: 2/2" in log and "phase 2: 1/1" in log, log
    assert by_id("job-bar").get_attribute("value") == by_id("job-bar").get_attribute("max")
    assert by_id("scene").get_attribute("value") == "clicked"

    # One image, shown on the page.
    by_id("prompt").clear()
    by_id("prompt").send_keys("a photo of <asset1>")
    browser.execute_script("document.querySelector('#generate-settings').parentElement.open = true")
    by_id("generate-settings-steps").send_keys("2")
    by_id("generate").click()
    wait_for(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth > 0"), "the image")
    path = browser.find_element("css selector", "#images img").get_attribute("title")
    assert Image.open(path).size[0] > 0


def test_a_reload_a_cancel_and_a_stopped_server_in_a_browser(browser, ui):
    """While a learn runs: the buttons that start another action are off (a double click
    sent two), a reload shows the photo, its objects and saved masks again and follows
    the learn (it showed "No photo open"), Cancel says it is stopping; and a server that
    is gone is said, not waited for."""
    from selenium.webdriver.support.ui import WebDriverWait

    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    browser.get(ui.server.url)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('canvas').width") == 96, "the photo")
    canvas = by_id("canvas")
    canvas.click()  # the middle of the photo, on the first object
    wait_for(browser, lambda d: canvas.get_attribute("data-masks") == "1", "the mask")
    by_id("save").click()
    wait_for(browser, lambda d: d.find_elements("css selector", "#saved li"), "the saved masks")
    canvas.click()  # a change after the save: the saved files are no longer what is shown
    wait_for(browser, lambda d: not d.find_elements("css selector", "#saved li"), "the save to be forgotten")
    by_id("save").click()
    wait_for(browser, lambda d: d.find_elements("css selector", "#saved li"), "the masks saved again")

    browser.execute_script("document.querySelector('#learn-settings').parentElement.open = true")
    by_id("learn-settings-steps1").send_keys("5000")
    by_id("learn-settings-prior").click()
    by_id("scene-name").send_keys("mine")
    by_id("learn").click()
    assert all(by_id(name).get_property("disabled") for name in ("learn", "generate", "open", "upload"))
    wait_for(browser, lambda d: "phase 1" in by_id("job-text").text, "the learn's progress")

    browser.refresh()
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('canvas').width") == 96
             and "phase 1" in by_id("job-text").text, "the photo and the learn after a reload")
    assert by_id("learn").get_property("disabled")
    # (Clicked and read in one turn of the page: the tiny learn may stop before a second look.)
    said = browser.execute_script("arguments[0].click(); return [document.getElementById('job-text').textContent,"
                                  " arguments[0].disabled]", by_id("cancel"))
    assert said[0].startswith("stopping (saving a checkpoint first)") and said[1], said
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element("tag name", "body").get_attribute("data-job")
                                       == "cancelled")
    assert "--resume" in by_id("error").text  # (the cancelled learn's line, shown as the command line shows it)
    assert by_id("error").text.endswith("(here: tick Resume, then Learn)")  # (and the page's own way on)
    assert not by_id("learn").get_property("disabled")

    browser.execute_script("document.getElementById('error').hidden = true")
    # The reload kept the objects (their clicks come back as masks) and the saved files.
    canvas = by_id("canvas")
    wait_for(browser, lambda d: canvas.get_attribute("data-masks") == "1"
             and len(d.find_elements("css selector", "#saved li")) == 2, "the objects and saved masks after the reload")
    by_id("learn").click()  # without Resume: refused at once (the checkpoint), and the buttons are back on
    WebDriverWait(browser, WAIT).until(lambda d: "--resume" in by_id("error").text
                                       and not by_id("learn").get_property("disabled"))

    # (the options and the scene's name set before the reload came back with it: without
    # the name, Resume looked for the photo's checkpoint, not this one's)
    assert by_id("learn-settings-steps1").get_property("value") == "5000"
    assert by_id("scene-name").get_property("value") == "mine"
    assert not by_id("learn-settings-prior").get_property("checked")
    by_id("resume").click()
    by_id("learn").click()
    WebDriverWait(browser, WAIT).until(lambda d: "phase 1" in by_id("job-text").text)
    ui.server.stop()  # the server is gone while the page follows the learn
    WebDriverWait(browser, WAIT).until(lambda d: "lost scenebreak ui (start it again and open the address it prints)"
                                       in by_id("error").text)
    assert not by_id("learn").get_property("disabled") and by_id("cancel").get_attribute("hidden")
    by_id("open").click()
    WebDriverWait(browser, WAIT).until(lambda d: "no answer from scenebreak ui" in by_id("error").text)


def test_a_photo_over_the_upload_limit_is_said_before_it_is_sent(browser, ui, tmp_path):
    """The server refuses it unread, and the browser then reports a lost connection: the
    page said "no answer from scenebreak ui", sending people to restart a running server."""
    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1 << 20
    browser.get(ui.server.url)
    # (the photo open first: while it is embedded the upload button is off)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('canvas').width") == 96
             and not by_id("upload").get_property("disabled"), "the photo")
    assert browser.execute_script("return page.maxUpload") == 64 << 20  # the server's own limit
    browser.execute_script("page.maxUpload = 1 << 20")
    by_id("upload").send_keys(str(big))
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT).until(lambda d: "big.png is over 1 MB" in by_id("error").text)
    assert not (ui.server.app.folder / "big.png").exists()


def test_a_photo_the_page_cannot_show_says_why(browser, ui):
    """It said "cannot show PATH" alone: the server's reason (outside the folders, gone
    since) was dropped."""
    browser.get(ui.server.url)
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "yes", "the page")
    said = browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; loadPhoto('/etc/hostname.png').then(() => done('shown'), "
        "(error) => done(error.message));")
    assert said.startswith("cannot show /etc/hostname.png: ") and "outside the folders" in said, said


def test_a_learn_that_ends_while_the_page_reloads_is_shown_as_it_ended(browser, ui, monkeypatch):
    """A reload follows a running job, but one that ended before the reloaded page asked
    was lost: no "Learned ..." line, no scene chosen (and a failed learn's reason and
    --resume hint never shown). The tab's job is replayed now, once."""
    import threading

    from scenebreak.train import learn as learn_module

    release = threading.Event()
    real_learn = learn_module.learn

    def held_learn(*args, **kwargs):  # ends only once the page has gone
        result = real_learn(*args, **kwargs)
        assert release.wait(WAIT)
        return result

    monkeypatch.setattr(learn_module, "learn", held_learn)
    by_id = lambda name: browser.find_element("id", name)  # noqa: E731
    browser.get(ui.server.url)
    wait_for(browser, lambda d: d.execute_script("return document.getElementById('canvas').width") == 96, "the photo")
    canvas = by_id("canvas")
    canvas.click()
    wait_for(browser, lambda d: canvas.get_attribute("data-masks") == "1", "the mask")
    by_id("save").click()
    wait_for(browser, lambda d: d.find_elements("css selector", "#saved li"), "the saved masks")
    browser.execute_script("document.querySelector('#learn-settings').parentElement.open = true")
    for name, value in (("steps1", "2"), ("steps2", "1")):
        by_id(f"learn-settings-{name}").send_keys(value)
    by_id("learn-settings-prior").click()
    by_id("scene-name").send_keys("away")
    by_id("learn").click()
    wait_for(browser, lambda d: by_id("job-text").text.startswith(("learn", "phase")), "the learn followed")

    browser.get("about:blank")  # the page is gone while the learn ends
    release.set()
    assert ui.wait()[-1]["state"] == "done"
    browser.get(ui.server.url)
    wait_for(browser, lambda d: "Learned <asset1> in away" in by_id("learned").text, "the ended learn shown")
    assert by_id("scene").get_attribute("value") == "away"
    assert "phase 2: 1/1" in by_id("log").text
    assert browser.find_element("tag name", "body").get_attribute("data-job") == "done"

    browser.refresh()  # shown once: a later reload is a page like any other
    wait_for(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded") == "yes", "the page")
    assert by_id("learned").text == "" and by_id("job").get_attribute("hidden")
