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
