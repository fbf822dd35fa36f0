"""The chat page in real headless Chromium (Debian's chromium + chromedriver)."""
import os
import shutil
import tempfile

import pytest
from sharing_model import CAT_PROMPT, shared_server

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,900"]

needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and not os.environ.get("MMDIALOG_REQUIRE_BROWSER"),
    reason="apt-get install -y chromium chromium-driver (MMDIALOG_REQUIRE_BROWSER=1 makes this an error)")


@needs_browser
def test_type_a_message_and_see_the_streamed_reply_with_its_photo(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, app = shared_server()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(srv.url + "/")
        assert driver.title.startswith(app.state.name)
        greeting = driver.find_element(By.CSS_SELECTOR, ".msg.greeting").text
        assert app.state.name in greeting and "show you" in greeting and "attach a photo" in greeting
        # Record every text the reply bubble shows while it is written: streaming shows it growing.
        driver.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
              const t = document.querySelector('.msg.assistant:not(.greeting) .text');
              if (t && (window.seen.length === 0 || window.seen[window.seen.length - 1] !== t.textContent))
                window.seen.push(t.textContent);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        driver.find_element(By.ID, "message").send_keys(CAT_PROMPT)
        driver.find_element(By.ID, "send").click()
        wait = WebDriverWait(driver, 180)
        img = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant img.shared"))[0]
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
        assert img.get_attribute("naturalWidth") == "451"
        assert img.get_attribute("src").startswith(srv.url + "/files/")
        bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert bubble.find_element(By.CSS_SELECTOR, ".text").text == "here she is"
        assert bubble.find_element(By.CSS_SELECTOR, ".source").text == "from your library"
        assert bubble.find_element(By.CSS_SELECTOR, ".caption").text == "my tabby cat"
        seen = [t for t in driver.execute_script("return window.seen") if t not in ("\u2026", "")]
        assert len(seen) >= 2 and seen[-1] == "here she is" and all("here she is".startswith(t) for t in seen), seen
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == [CAT_PROMPT]
        driver.save_screenshot(os.environ.get("MMDIALOG_SCREENSHOT", str(tmp_path / "chat.png")))
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def _driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


LAYOUT = """
    const log = document.getElementById('log'), form = document.getElementById('form');
    const last = log.lastElementChild.getBoundingClientRect(), bar = form.getBoundingClientRect();
    return {lastTop: last.top, lastBottom: last.bottom, barTop: bar.top, barBottom: bar.bottom,
            viewH: window.innerHeight, viewW: window.innerWidth, docW: document.documentElement.scrollWidth,
            bodyW: document.body.scrollWidth, overflowing: log.scrollHeight > log.clientHeight};"""


@needs_browser
@pytest.mark.slow
@pytest.mark.parametrize("width,height", [(1280, 560), (390, 560)])  # short: three turns overflow
def test_the_newest_message_stays_in_view_the_page_fits_a_phone_and_new_chat_starts_over(tmp_path, width, height):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, app = shared_server()
    driver = _driver(tmp_path)
    shots = tmp_path / f"screens-{width}"
    shots.mkdir()
    try:
        driver.set_page_load_timeout(60)
        # The phone: its viewport exactly (a headless window has a minimum width of its own).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
        driver.get(srv.url + "/")
        wait = WebDriverWait(driver, 180)
        for n in range(3):  # three photos and their texts: more than one screen
            driver.find_element(By.ID, "message").send_keys(CAT_PROMPT)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == n + 1)
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('img.shared')].every(i => i.complete && i.naturalWidth)"))
            driver.execute_script("return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            box = driver.execute_script(LAYOUT)
            driver.save_screenshot(str(shots / f"turn-{n + 1}.png"))
            # The newest reply is above the input bar, inside the window, and nothing is wider than the window.
            assert box["lastBottom"] <= box["barTop"] + 1 and box["barBottom"] <= box["viewH"] + 1, box
            assert box["lastTop"] < box["barTop"], box
            assert box["docW"] <= box["viewW"] and box["bodyW"] <= box["viewW"], box
        assert box["overflowing"], "the conversation should be longer than the window by now"
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 3
        driver.find_element(By.ID, "new-chat").click()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#log > *")) == 1
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.greeting") and driver.execute_script("return history.length") == 0
        driver.find_element(By.ID, "message").send_keys(CAT_PROMPT)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
        assert driver.execute_script("return history.length") == 2  # the new chat holds only its own turn
        driver.save_screenshot(str(shots / "new-chat.png"))
        print(f"screenshots: {shots}")
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
