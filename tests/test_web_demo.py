"""The gradio web demo in headless Debian Chromium: ask, see the answer to that question, stop a long
answer with the Stop button, close pages mid-answer ten times and still get answers, keep a
screenshot (artifacts/web_demo.png, gitignored) as the test artifact.

Needs Debian's chromium + chromium-driver (.ci/serve_setup.sh installs them) and selenium; skips
with the reason otherwise. The model is the echo model of tests/echo_model.py: "A <keyword>" for
the keyword the question names most; " pain" never ends (the answers that are stopped or left).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.echo_model import KEYWORDS, LOOP

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a closed network: without the background-networking ones Chromium keeps dialling out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,800"]
LONG = 4000  # --max_new_tokens: a LOOP answer this long takes seconds, long enough to stop or walk away from
CANCELLED = re.compile(r"generation cancelled after (\d+) tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(server: subprocess.Popen, log: Path) -> None:
    """SIGTERM must end the web demo (killed, and the test failed, if it does not within 30 s)."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        pytest.fail(f"SIGTERM did not stop the web demo:\n{log.read_text()[-3000:]}")


@pytest.mark.smoke
def test_web_demo_in_headless_chromium(echo_model_dir, tmp_path):
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
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "tools/web_demo.py"), "--model_name_or_path", str(echo_model_dir),
           "--port", str(port), "--max_new_tokens", str(LONG)]
    log = tmp_path / "web_demo.log"
    with open(log, "w") as out:  # a file: a pipe nobody reads would fill up and stall the server
        server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    driver = None

    def cancelled() -> list[int]:
        return [int(n) for n in CANCELLED.findall(log.read_text())]

    def wait(cond, what: str, timeout: float = 120):
        try:
            return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond())
        except Exception as e:  # noqa: BLE001 - the page and the server's log say what went wrong
            pytest.fail(f"waiting for {what}: {type(e).__name__} {e}; answers on the page: {bot_texts()}\n"
                        f"server log:\n{log.read_text()[-3000:]}")

    def bot_texts() -> list[str]:  # read in one go: the elements are replaced while an answer streams in
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('.message.bot'), e => e.innerText.trim())")

    def ask(text: str) -> None:
        box = wait(lambda: driver.find_element(By.CSS_SELECTOR, "#question textarea"), "the question box")
        box.send_keys(text)

    def answered(expected: str) -> None:
        wait(lambda: bot_texts() and bot_texts()[-1] == expected, f"the answer {expected!r}")

    def looping():  # a LOOP answer is streaming in
        return bot_texts() and bot_texts()[-1].startswith(f"A {LOOP} {LOOP}")

    try:
        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"web demo exited with {server.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("web demo did not come up")

        h = httpx.get(f"{url}health", timeout=10)
        assert h.status_code == 200 and h.json()["status"] == "ok" and not h.json()["running"]

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
            opts.add_argument(flag)
        # an explicit driver path: selenium never tries to download one
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.get(url)
        main = driver.current_window_handle

        # Enter sends; the answer is the one to this question
        ask("What causes a fever?")
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(Keys.ENTER)
        answered("A fever")
        page = driver.find_element(By.TAG_NAME, "body").text
        assert "What causes a fever?" in page and "medgpt-ds" in page

        # the Send button (a new conversation: the echo model answers the keyword of the whole chat);
        # then Stop ends a long answer, and the next question is answered
        driver.get(url)
        ask(f"the {LOOP}")
        driver.find_element(By.XPATH, "//button[normalize-space()='Send']").click()
        wait(looping, "a long answer streaming in")
        driver.find_element(By.XPATH, "//button[normalize-space()='Stop']").click()
        wait(lambda: len(cancelled()) == 1, "the Stop to cancel the generation")
        stopped = bot_texts()[-1]
        driver.get(url)  # a new conversation: the echo model would echo the stopped answer's keyword
        ask("a cough and a cough\n")
        answered("A cough")
        assert stopped.startswith(f"A {LOOP}") and cancelled()[0] < LONG
        shot = ROOT / "artifacts" / "web_demo.png"
        shot.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(shot))
        print(f"web demo screenshot: {shot}")
        assert shot.stat().st_size > 1000

        # ten pages closed mid-answer, each followed by a question that must be answered
        words = [k for k in KEYWORDS if k != LOOP]
        for i in range(10):
            driver.switch_to.new_window("tab")
            driver.get(url)
            ask(f"the {LOOP}\n")
            wait(looping, f"long answer {i} streaming in")
            driver.close()
            driver.switch_to.window(main)
            driver.get(url)
            ask(f"the {words[i % len(words)]}\n")
            answered(f"A {words[i % len(words)]}")
        wait(lambda: len(cancelled()) == 11, "every closed page to cancel its generation")
        assert all(n < LONG for n in cancelled())
        h = httpx.get(f"{url}health", timeout=10).json()
        assert (h["status"], h["running"], h["cancelled"], h["completed"], h["failed"]) == ("ok", False, 11, 12, 0)
    finally:
        if driver is not None:
            driver.quit()
        stop(server, log)
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


@pytest.mark.smoke
def test_web_demo_queue_full_is_refused_and_the_model_stays_free(echo_model_dir, tmp_path):
    """--max_queue 1 through gradio's own client: of three long questions at once one runs, one
    waits, one is refused ("Queue is full"); when the clients go away both generations are cancelled,
    /health is back to idle, and the next question is answered."""
    pytest.importorskip("gradio", reason="gradio not installed (pip install gradio)")
    httpx = pytest.importorskip("httpx", reason="httpx not installed")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "web_demo.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(ROOT / "tools/web_demo.py"), "--model_name_or_path",
                                   str(echo_model_dir), "--port", str(port), "--max_new_tokens", str(LONG),
                                   "--max_queue", "1"], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def health() -> dict:
        return httpx.get(f"{url}health", timeout=10).json()

    def until(cond, what: str, timeout: float = 120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if server.poll() is not None:
                pytest.fail(f"web demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if cond():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"waiting for {what}; health {health()}\nserver log:\n{log.read_text()[-3000:]}")

    try:
        until(lambda: health()["status"] == "ok", "the web demo to come up")
        client = Client(url, verbose=False)
        jobs = [client.submit(f"the {LOOP}", "", LONG, 0.0, api_name="/respond") for _ in range(3)]
        # gradio's queue holds the waiting question (the model's own lock sees only the running one)
        until(lambda: sum(j.done() for j in jobs) == 1 and health()["running"], "one question running and one refused")
        refused = [j for j in jobs if j.done()]
        assert "Queue is full" in str(refused[0].exception())
        assert not isinstance(refused[0].exception(), AppError)  # refused by the queue, not failed in the app
        assert sorted(j.status().code.name for j in jobs if not j.done()) == ["IN_QUEUE", "ITERATING"]
        for j in jobs:  # the user leaves: both generations must end, the waiting one never holding the model
            j.cancel()
        client.close()
        until(lambda: not health()["running"] and health()["cancelled"] >= 1, "the abandoned generations to be cancelled")
        assert health()["completed"] == 0 and all(n < LONG for n in map(int, CANCELLED.findall(log.read_text())))
        again = Client(url, verbose=False)
        assert again.predict("What causes a fever?", "", 16, 0.0, api_name="/respond") == "A fever"
        again.close()
        h = health()
        assert (h["status"], h["running"], h["failed"], h["completed"]) == ("ok", False, 0, 1), h
    finally:
        stop(server, log)
