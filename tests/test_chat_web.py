"""The web chat page in a real browser (Debian's Chromium, driven by Playwright), against a scripted model server
that streams its replies slowly: the answer appears while it is written, the sources open, a refusal becomes a
hand-off in the page and in the hand-off log, a thumbs up lands in the feedback log, a failing server shows an
error and the page keeps working."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port
from tests.fake_server import FakeOpenAI, Reply

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ANSWER = "vLLM listens on port 8000 by default and serves the chat completions API there"
COT = f"The guide says ##begin_quote## The server listens on port 8000 by default ##end_quote##.\n<ANSWER>: {ANSWER}"
REFUSAL = "Sorry, I don't know the answer to this question because related documents are not found. Please try again."


def scripted(body, n, answer=Reply(content=COT, piece_delay=0.08)):
    """The model: a refusal for the weather, HTTP 500 for a crash, else `answer` (streamed slowly enough to see)."""
    question = body["messages"][-1]["content"].strip().splitlines()[-1]
    if "weather" in question:
        return Reply(content=f"None of the documents is about it.\n<ANSWER>: {REFUSAL}")
    if "crash" in question:
        return Reply(status=500)
    return answer


@contextlib.contextmanager
def running_chat(model, port: int, *flags, env: dict = {}):
    """chat.py with `flags` (--web or --serve) on `port`, over `model` (the scripted server, or model flags such as
    ["--model_path", DIR]), until the block ends."""
    model_flags = ["-u", model.url] if hasattr(model, "url") else list(model)
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "chat.py"), *model_flags, "--retriever", "bm25", "-r", "3", "--port", str(port),
         *flags], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        assert server.poll() is None, server.stdout.read()
        yield server
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is not installed: apt-get install chromium (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("web")
    port = free_port()
    with FakeOpenAI(models=("raft-student",)) as fake:
        fake.script = scripted
        with running_chat(fake, port, "--web", "--handoff_log", str(folder / "handoffs.jsonl"),
                          "--feedback_log", str(folder / "feedback.jsonl")):
            yield f"http://127.0.0.1:{port}", folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def ask(page, question: str):
    page.fill("#question textarea", question)
    page.keyboard.press("Enter")


def conversation(page) -> str:
    return page.inner_text("#conversation")


def test_the_page_streams_answers_shows_sources_hands_off_records_feedback_and_survives_a_failure(page_url, browser):
    url, folder = page_url
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(url)
    page.wait_for_selector("#question textarea")

    # 1. The answer streams in: seen part-written before it is whole; only the answer part, no quote markers.
    ask(page, "Which port does vLLM listen on?")
    seen, deadline = [], time.time() + 60
    while time.time() < deadline:
        text = conversation(page)
        seen.append(text)
        if ANSWER in text:
            break
        time.sleep(0.05)
    assert ANSWER in seen[-1]
    assert any("vLLM listens" in text and ANSWER not in text for text in seen), "the answer did not stream in"
    assert "begin_quote" not in seen[-1]

    # 2. The sources of the answer, in a panel that opens: file name, rank and the chunk's text.
    assert not page.is_visible("#sources-text")
    page.click("#sources")
    page.wait_for_selector("#sources-text", state="visible")
    sources = page.inner_text("#sources-text")
    assert "[1] serving_llama.html" in sources and "port" in sources

    # 3. A thumbs up on that answer: one line of the feedback log, in the eval file's format plus the verdict.
    page.click("#conversation button[aria-label='Like']")
    deadline = time.time() + 20
    log = folder / "feedback.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().endswith("\n")):   # the line written
        time.sleep(0.2)
    [feedback] = [json.loads(line) for line in open(folder / "feedback.jsonl")]
    assert feedback["question"] == "Which port does vLLM listen on?" and feedback["answer"] == ANSWER
    assert feedback["verdict"] == "up" and feedback["sources"][0].endswith("serving_llama.html")

    # 4. A question the documents do not answer: a hand-off, distinct from an answer, in the page and in the log.
    ask(page, "What will the weather be tomorrow?")
    page.wait_for_selector("text=This needs a person", timeout=30000)
    [handoff] = [json.loads(line) for line in open(folder / "handoffs.jsonl")]
    assert handoff["question"] == "What will the weather be tomorrow?" and len(handoff["sources"]) == 3
    assert {"time", "model"} <= set(handoff)

    # 5. A failing model server: an error in the conversation, and the next question is answered.
    ask(page, "Why does the server crash?")
    page.wait_for_selector("text=The model server failed", timeout=30000)
    ask(page, "And which port again?")
    deadline = time.time() + 60
    while time.time() < deadline and conversation(page).count(ANSWER) < 2:
        time.sleep(0.2)
    assert conversation(page).count(ANSWER) == 2
    page.screenshot(path=str(folder / "web_chat.png"), full_page=True)
    assert (folder / "web_chat.png").stat().st_size > 10_000
    page.close()


def test_a_reasoning_switch_shows_the_chain_of_thought(page_url, browser):
    url, _ = page_url
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#question textarea")
    page.check("#show-reasoning input")
    ask(page, "Which port does vLLM listen on?")
    page.wait_for_selector(f"text={ANSWER}", timeout=60000)
    text = conversation(page)
    assert "The guide says" in text and "<ANSWER>" in text
    page.close()
