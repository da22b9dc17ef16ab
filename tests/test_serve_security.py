"""chat.py --serve as an attacker and an unlucky operator meet it: a rebinding Host, a foreign Origin, a text/plain
body, an oversized body and question, a flood beyond the queue, clients that disconnect, a failing model (the
server's and one in this process), and an open bind without a key. After each, a normal request still succeeds."""
import concurrent.futures
import contextlib
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT
from tests.fake_server import FakeOpenAI, Reply
from tests.test_chat_web import ANSWER, COT, free_port, running_chat

QUESTION = {"model": "raft-student", "messages": [{"role": "user", "content": "Which port does vLLM listen on?"}]}


@contextlib.contextmanager
def serving(*flags, model: list[str]):
    """chat.py --serve on a free port with `flags` and the model flags `model`; yields its base URL."""
    port = free_port()
    with running_chat(model, port, "--serve", *flags):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAI(models=("raft-student",)) as fake:
        fake.script = lambda body, n: Reply(content=COT)
        yield fake


@pytest.fixture(scope="module")
def endpoint(upstream):
    with serving("--allowed_hosts", "chat.internal", "--allowed_origins", "https://app.example",
                 "--max_request_bytes", "4096", "--max_question_chars", "300", "--max_messages", "4",
                 "--request_max_tokens", "64", model=["-u", upstream.url]) as url:
        yield url


def ask(url, body=QUESTION, **headers) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def answered_normally(url) -> bool:
    reply = ask(url)
    return reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == ANSWER


def error_of(reply: httpx.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} == set(body["error"])
    return body["error"]


def test_a_rebinding_host_is_refused(endpoint):
    for host in ("attacker.example", "attacker.example:8090", "10.1.2.3"):
        reply = ask(endpoint, Host=host)
        assert reply.status_code == 403 and error_of(reply)["code"] == "host_not_allowed"
    assert ask(endpoint, Host="chat.internal:8090").status_code == 200        # named with --allowed_hosts
    assert ask(endpoint, Host="localhost").status_code == 200
    assert answered_normally(endpoint)


def test_a_foreign_origin_is_refused_and_only_an_allowed_one_gets_cors_headers(endpoint):
    foreign = ask(endpoint, Origin="https://evil.example")
    assert foreign.status_code == 403 and error_of(foreign)["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in foreign.headers
    preflight = httpx.options(endpoint + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    allowed = httpx.options(endpoint + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == "https://app.example"
    reply = ask(endpoint, Origin="https://app.example")
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in ask(endpoint).headers             # no Origin: no CORS headers
    assert answered_normally(endpoint)


def test_a_body_that_is_not_json_typed_is_refused(endpoint):
    """A page can POST text/plain with no CORS preflight: such a body is never read as a request."""
    reply = httpx.post(endpoint + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                       headers={"Content-Type": "text/plain"})
    assert reply.status_code == 415 and error_of(reply)["code"] == "unsupported_media_type"
    assert answered_normally(endpoint)


def test_oversized_bodies_questions_and_conversations_are_refused_with_the_limit(endpoint, upstream):
    big = {"model": "raft-student", "messages": [{"role": "user", "content": "x " * 5000}]}
    reply = ask(endpoint, big)
    assert reply.status_code == 413 and "4096 bytes" in error_of(reply)["message"]
    long_question = {"model": "raft-student", "messages": [{"role": "user", "content": "why " * 100}]}
    reply = ask(endpoint, long_question)
    assert reply.status_code == 400 and "at most 300 are accepted" in error_of(reply)["message"]
    chatty = {"model": "raft-student", "messages": [{"role": "user", "content": "hi"}] * 5}
    reply = ask(endpoint, chatty)
    assert reply.status_code == 400 and "at most 4 are accepted" in error_of(reply)["message"]
    before = len(upstream.requests)
    assert ask(endpoint, {**QUESTION, "max_tokens": 100_000}).status_code == 200
    assert upstream.requests[before]["max_tokens"] == 64                        # capped
    assert answered_normally(endpoint)


def test_a_flood_beyond_the_queue_gets_429_and_the_server_keeps_answering():
    with FakeOpenAI(models=("raft-student",)) as slow:
        slow.script = lambda body, n: Reply(content=COT, delay=1.0)
        with serving("--concurrency", "1", "--queue_size", "1", model=["-u", slow.url]) as url:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda _: ask(url), range(8)))
            statuses = sorted(r.status_code for r in replies)
            assert statuses.count(200) >= 2 and statuses.count(429) >= 4 and set(statuses) == {200, 429}
            busy = next(r for r in replies if r.status_code == 429)
            assert busy.headers["retry-after"] == "2" and error_of(busy)["code"] == "busy"
            assert slow.most_in_flight == 1
            assert answered_normally(url)


def test_a_client_that_disconnects_frees_its_slot_within_a_second():
    with FakeOpenAI(models=("raft-student",)) as slow:
        slow.script = lambda body, n: Reply(content=COT * 20, piece_delay=0.05)     # about 30 s to stream
        with serving("--concurrency", "1", "--queue_size", "0", model=["-u", slow.url]) as url:
            for stream in (True, False):
                give_up = httpx.Timeout(60, read=1.0)
                if stream:
                    with httpx.stream("POST", url + "/v1/chat/completions", json={**QUESTION, "stream": True},
                                      timeout=give_up) as reply:
                        next(reply.iter_bytes())            # the answer has started: the slot is taken
                else:
                    with pytest.raises(httpx.ReadTimeout):  # no answer within a second: the client gives up
                        httpx.post(url + "/v1/chat/completions", json=QUESTION, timeout=give_up)
                gone = time.time()
                slow.script = lambda body, n: Reply(content=COT)
                while ask(url).status_code == 429:
                    assert time.time() - gone < 1.5, "the slot was not freed within a second"
                    time.sleep(0.05)
                slow.script = lambda body, n: Reply(content=COT * 20, piece_delay=0.05)


def test_a_failing_model_server_ends_the_request_without_its_address_or_body(capfd):
    with FakeOpenAI(models=("raft-student",)) as upstream:
        upstream.script = lambda body, n: Reply(status=500, raw=b'{"error": "secret stack trace from 10.0.0.7"}')
        with serving(model=["-u", upstream.url]) as url:
            for stream in (False, True):
                reply = ask(url, {**QUESTION, "stream": stream})
                text = reply.text
                assert "127.0.0.1" not in text and "10.0.0.7" not in text and str(upstream.server.server_address[1]) \
                    not in text and "the model server failed to answer" in text
                assert reply.status_code == (200 if stream else 502)          # a stream has already begun
            upstream.script = lambda body, n: Reply(content=COT)
            assert answered_normally(url)


def test_a_generation_that_fails_in_this_process_ends_the_request_and_releases_the_model(tiny_model):
    """A temperature of 1e-40 gives inf/NaN logits: the generation thread dies, and before this fix the stream
    waited forever with the model's lock held."""
    with serving("--concurrency", "2", "--max_tokens", "4", model=["--model_path", str(tiny_model)]) as url:
        failed = httpx.post(url + "/v1/chat/completions", json={**QUESTION, "model": tiny_model.name,
                                                                 "temperature": 1e-40}, timeout=120)
        assert failed.status_code == 500 and "the model failed to answer" in error_of(failed)["message"]
        ok = httpx.post(url + "/v1/chat/completions", json={**QUESTION, "model": tiny_model.name}, timeout=120)
        assert ok.status_code == 200 and ok.json()["reasoning"]


@pytest.mark.parametrize("face, flags, needs", [
    ("--serve", ["--host", "0.0.0.0"], "an API key (--server_api_key or RAG_SERVER_API_KEY)"),
    ("--web", ["--host", "0.0.0.0"], "a login (--web_login USER:PASSWORD or RAG_WEB_LOGIN)"),
    ("--web", ["--share"], "a login (--web_login USER:PASSWORD or RAG_WEB_LOGIN)"),
])
def test_an_open_bind_without_a_key_is_refused_unless_asked_for_by_name(face, flags, needs, upstream):
    env = {k: v for k, v in os.environ.items() if k not in ("RAG_SERVER_API_KEY", "RAG_WEB_LOGIN")}
    done = subprocess.run([sys.executable, str(ROOT / "chat.py"), "-u", upstream.url, face, *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and needs in done.stderr
    assert "--allow_unauthenticated_network_access" in done.stderr


def test_an_open_bind_starts_with_a_key_or_when_asked_for_by_name(upstream):
    with serving("--host", "0.0.0.0", "--server_api_key", "k3y", model=["-u", upstream.url]) as url:
        assert answered_normally(url) is False                                    # no key: 401
        assert ask(url, Authorization="Bearer k3y").status_code == 200
    with serving("--host", "0.0.0.0", "--allow_unauthenticated_network_access", model=["-u", upstream.url]) as url:
        assert answered_normally(url)
