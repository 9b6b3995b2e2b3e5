"""The gradio web demo in headless Debian Chromium: type a question, see the answer, keep a screenshot
(artifacts/web_demo.png, gitignored) as the test artifact.

Needs Debian's chromium + chromium-driver (.ci/serve_setup.sh installs them) and selenium; skips
with the reason otherwise. The model is the hand-built bigram of test_inference.py ("A B").
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ANSWER

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,800"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.smoke
def test_web_demo_answers_in_headless_chromium(model_dir, tmp_path):
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            pytest.skip(f"{path} absent: apt-get install {pkg} (bash .ci/serve_setup.sh)")
    pytest.importorskip("gradio", reason="gradio not installed (pip install gradio)")
    httpx = pytest.importorskip("httpx", reason="httpx not installed")
    pytest.importorskip("selenium", reason="selenium not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(ROOT / "tools/web_demo.py"), "--model_name_or_path", str(model_dir),
           "--port", str(port), "--max_new_tokens", "16"]
    server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    driver = None
    try:
        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"web demo exited with {server.returncode}:\n{server.stdout.read()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("web demo did not come up")

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
            opts.add_argument(flag)
        # an explicit driver path: selenium never tries to download one
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.get(url)
        box = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        box.send_keys("What causes a fever?")
        box.send_keys(Keys.ENTER)

        def bot_texts(d):
            texts = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".message.bot")]
            return texts if ANSWER in texts else False

        WebDriverWait(driver, 60).until(bot_texts)
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "What causes a fever?" in page and "medgpt-ds" in page
        shot = ROOT / "artifacts" / "web_demo.png"
        shot.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(shot))
        print(f"web demo screenshot: {shot}")
        assert shot.stat().st_size > 1000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
