"""The client against a scripted server over real HTTP: retries, fail-fast errors, cache, limits."""
import asyncio
import gc
import json
import socket
import time

import pytest

from errors import LLMFatalError
from llm_client import ChatClient, RateLimiter, without_thinking
from replicas import Replicas
from reply_cache import ResponseCache, cache_key
from tests.fake_server import FakeOpenAI, Reply

HELLO = [{"role": "user", "content": "hello"}]
OPEN_CLIENTS = []


@pytest.fixture(autouse=True)
def close_clients(monkeypatch):
    """Every client a test makes is closed after it, so no connection or event loop outlives its test."""
    original_init = ChatClient.__post_init__

    def tracked(self):
        original_init(self)
        OPEN_CLIENTS.append(self)
    monkeypatch.setattr(ChatClient, "__post_init__", tracked)
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def client_for(fake, tmp_path=None, **kw):
    settings = dict(model="teacher", max_retries=3, backoff_base=0.05, backoff_max=0.2, timeout=5)
    settings.update(kw)
    if tmp_path is not None:
        settings["cache_path"] = str(tmp_path / "cache.jsonl")
    client = ChatClient([fake.url], **settings)
    client.preflight()
    return client


def test_429_then_success_honours_retry_after(fake):
    fake.script = lambda body, n: Reply(429, headers={"Retry-After": "1"}) if n == 0 else Reply(content="fine")
    client = client_for(fake)
    started = time.monotonic()
    [result] = client.complete_all([(HELLO, {"max_tokens": 8})], "t")
    assert result.text == "fine" and client.usage.retries == 1
    assert time.monotonic() - started >= 1.0      # waited as the server asked, not the 0.05 s backoff


def test_408_and_a_malformed_retry_after_are_retried(fake):
    replies = {0: Reply(408), 1: Reply(503, headers={"Retry-After": "in a while"})}
    fake.script = lambda body, n: replies.get(n, Reply(content="fine"))
    client = client_for(fake)
    [result] = client.complete_all([(HELLO, {})], "t")
    assert result.text == "fine" and client.usage.retries == 2 and len(fake.requests) == 3


def test_a_request_that_keeps_getting_429_waits_up_to_rate_limit_wait_then_is_dropped(fake):
    """429s are not counted against max_retries (a busy cloud API can refuse for minutes) but against a total
    wait; other requests are not held up."""
    fake.script = lambda body, n: Reply(429, headers={"Retry-After": "0.2"}) \
        if body["messages"][0]["content"] == "busy" else None
    client = client_for(fake, max_retries=0, rate_limit_wait=0.7)
    started = time.monotonic()
    busy, other = client.complete_all([([{"role": "user", "content": "busy"}], {}), (HELLO, {})], "t")
    assert busy.text is None and busy.error.startswith("HTTP 429 for") and "rate_limit_wait 0.7 s" in busy.error
    assert other.text is not None
    assert sum(r["messages"][0]["content"] == "busy" for r in fake.requests) == 4     # waited 3 x 0.2 s, not 0 retries
    assert 0.55 < time.monotonic() - started < 2


def test_every_retry_takes_its_place_in_the_rate_windows(fake):
    fake.script = lambda body, n: Reply(500) if n == 0 else None
    client = client_for(fake, rpm=100)
    client.complete_all([(HELLO, {"max_tokens": 5})], "t")
    assert len(client._limiter.window) == 2         # the failed attempt counted too, as the provider counts it


def test_repeated_500s_give_up_on_that_request_only(fake):
    fake.script = lambda body, n: Reply(500) if body["messages"][0]["content"] == "bad" else None
    client = client_for(fake, max_retries=2)
    bad, good = client.complete_all([([{"role": "user", "content": "bad"}], {}), (HELLO, {})], "t")
    assert bad.text is None and bad.error == "HTTP 500"
    assert good.text is not None
    assert sum(r["messages"][0]["content"] == "bad" for r in fake.requests) == 3   # 1 try + 2 retries
    assert client.usage.failed == 1


def test_a_hanging_request_times_out_and_is_retried(fake):
    fake.script = lambda body, n: Reply(content="late", delay=3) if n == 0 else Reply(content="on time")
    client = client_for(fake, timeout=0.5)
    [result] = client.complete_all([(HELLO, {})], "t")
    assert result.text == "on time" and len(fake.requests) == 2


@pytest.mark.parametrize("raw", [b"not json at all", b'{"choices": []}', b'{"choices": [{"message": {"content": 7}}]}'])
def test_malformed_bodies_are_retried(fake, raw):
    fake.script = lambda body, n: Reply(200, raw=raw) if n == 0 else Reply(content="ok")
    [result] = client_for(fake).complete_all([(HELLO, {})], "t")
    assert result.text == "ok" and len(fake.requests) == 2


def test_an_empty_reply_is_a_failure_and_is_retried(fake):
    fake.script = lambda body, n: Reply(content=" \n") if n == 0 else Reply(content="ok")
    [result] = client_for(fake).complete_all([(HELLO, {})], "t")
    assert result.text == "ok" and len(fake.requests) == 2
    fake.script = lambda body, n: Reply(content="")
    [result] = client_for(fake).complete_all([(HELLO, {})], "t")
    assert result.text is None and result.error == "empty reply"


def test_a_reply_cut_at_max_tokens_is_marked_and_cached_as_such(fake, tmp_path):
    fake.script = lambda body, n: Reply(content="a long story that goes on and", finish_reason="length")
    client = client_for(fake, tmp_path)
    [result] = client.complete_all([(HELLO, {"max_tokens": 8})], "t")
    assert result.text.startswith("a long story") and result.truncated and client.usage.truncated == 1
    client.close()
    again = client_for(fake, tmp_path)
    [cached] = again.complete_all([(HELLO, {"max_tokens": 8})], "t")
    assert cached.cached and cached.truncated and len(fake.requests) == 1


def test_the_cache_key_follows_the_model_fingerprint(fake, tmp_path):
    first = client_for(fake, tmp_path, fingerprint="aaaa")
    first.complete_all([(HELLO, {})], "t")
    first.close()
    same, other = client_for(fake, tmp_path, fingerprint="aaaa"), client_for(fake, tmp_path, fingerprint="bbbb")
    assert same.complete_all([(HELLO, {})], "t")[0].cached
    assert not other.complete_all([(HELLO, {})], "t")[0].cached and len(fake.requests) == 2
    assert cache_key("m", HELLO, {}) != cache_key("m", HELLO, {}, "aaaa")


def test_the_model_description_has_the_servers_fields_but_no_host_or_time():
    with FakeOpenAI(models=("m",), model_info={"root": "/models/a", "max_model_len": 8192}) as a, \
            FakeOpenAI(models=("m",), model_info={"root": "/models/a", "max_model_len": 8192}) as b:
        client = ChatClient(urls=[a.url, b.url], model="m", max_retries=0)
        client.preflight()
        assert client.identify_model() == {"servers": [{"id": "m", "root": "/models/a", "max_model_len": 8192}],
                                           "revision": ""}
        client.close()


def test_400_is_not_retried(fake):
    fake.script = lambda body, n: Reply(400, raw=b'{"error": "prompt too long"}')
    [result] = client_for(fake).complete_all([(HELLO, {})], "t")
    assert result.text is None and "HTTP 400" in result.error and len(fake.requests) == 1


def test_rejected_key_fails_fast_without_echoing_the_key():
    with FakeOpenAI(api_key="right") as fake:
        client = ChatClient([fake.url], api_key="wrong-secret-123", model="teacher")
        with pytest.raises(LLMFatalError) as error:
            client.preflight()
        assert "rejected the API key (HTTP 401)" in str(error.value) and "-k" in str(error.value)
        assert "wrong-secret-123" not in str(error.value)
        ok = ChatClient([fake.url], api_key="right", model="teacher")
        assert ok.preflight() == "teacher"


def test_unknown_model_and_model_discovery(fake):
    with pytest.raises(LLMFatalError, match="model 'llama-70b' is not served .* it serves: teacher: use one of these names"):
        ChatClient([fake.url], model="llama-70b").preflight()
    assert ChatClient([fake.url]).preflight() == "teacher"       # the only model served
    with FakeOpenAI(models=("a", "b")) as two:
        with pytest.raises(LLMFatalError, match="serves 2 models"):
            ChatClient([two.url]).preflight()


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # closed again at once: nothing listens there
    client = ChatClient([f"http://127.0.0.1:{port}/v1"], model="m", backoff_base=0.01, max_retries=1)
    with pytest.raises(LLMFatalError, match=f"cannot reach http://127.0.0.1:{port} .*start the server or fix -u"):
        client.preflight()


def test_wrong_base_url_is_explained(fake):
    with pytest.raises(LLMFatalError, match="answered HTTP 404: -u must be the API base URL, usually ending in /v1"):
        ChatClient([fake.url.replace("/v1", "")], model="teacher").preflight()


def test_requests_spread_over_replicas(tmp_path):
    with FakeOpenAI() as one, FakeOpenAI() as two:
        client = ChatClient([one.url, two.url], model="teacher")
        client.preflight()
        client.complete_all([([{"role": "user", "content": f"q{i}"}], {}) for i in range(10)], "t")
        assert len(one.requests) == 5 and len(two.requests) == 5


def test_in_flight_bound_is_respected(fake):
    active, peak = [0], [0]

    def script(body, n):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        active[0] -= 1
        return None

    fake.script = script
    client = client_for(fake, max_in_flight=3)
    client.complete_all([([{"role": "user", "content": f"q{i}"}], {}) for i in range(12)], "t")
    assert peak[0] <= 3 and len(fake.requests) == 12


def test_rpm_and_tpm_windows_make_requests_wait():
    async def starts(limiter, estimates):
        began = time.monotonic()
        times = []
        for estimate in estimates:
            entry = await limiter.acquire(lambda: estimate)
            times.append(time.monotonic() - began)
            RateLimiter.settle(entry, estimate)
        return times
    # A 0.5 s window stands in for the minute: the third request waits for the first to leave the window.
    by_requests = asyncio.run(starts(RateLimiter(rpm=2, tpm=0, period=0.5), [1, 1, 1]))
    assert by_requests[1] < 0.1 and 0.45 < by_requests[2] < 0.8
    by_tokens = asyncio.run(starts(RateLimiter(rpm=0, tpm=100, period=0.5), [60, 30, 20]))
    assert by_tokens[1] < 0.1 and 0.45 < by_tokens[2] < 0.8
    assert asyncio.run(RateLimiter(0, 0).acquire(lambda: 1 / 0)) is None     # no limit: no estimate either


def test_client_settles_the_window_with_real_usage(fake):
    client = client_for(fake, rpm=100)
    client.complete_all([([{"role": "user", "content": f"q{i}"}], {"max_tokens": 1000}) for i in range(2)], "t")
    assert [entry[1] < 1000 for entry in client._limiter.window] == [True, True]


def test_cache_answers_a_rerun_without_sending(fake, tmp_path):
    requests = [([{"role": "user", "content": f"q{i}"}], {"max_tokens": 4}) for i in range(5)]
    first = client_for(fake, tmp_path).complete_all(requests, "t")
    second_client = client_for(fake, tmp_path)
    second = second_client.complete_all(requests, "t")
    assert [r.text for r in first] == [r.text for r in second]
    assert len(fake.requests) == 5 and second_client.usage.cached == 5 and all(r.cached for r in second)


def test_cache_key_depends_on_model_messages_and_params():
    base = cache_key("m", HELLO, {"temperature": 0})
    assert base == cache_key("m", HELLO, {"temperature": 0})
    assert base != cache_key("m2", HELLO, {"temperature": 0})
    assert base != cache_key("m", [{"role": "user", "content": "hello!"}], {"temperature": 0})
    assert base != cache_key("m", HELLO, {"temperature": 0.5})


def test_an_earlier_jsonl_cache_is_imported_once_and_its_torn_line_skipped(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "text": "A", "prompt_tokens": 1, "completion_tokens": 1}) + "\n"
                    + '{"key": "b", "text": "tor')
    cache = ResponseCache(str(path))
    assert cache.path == tmp_path / "cache.sqlite"
    assert cache.get("a")["text"] == "A" and cache.get("b") is None and cache.torn_lines == 1
    cache.put("c", "C", 2, 3)
    cache.close()
    reloaded = ResponseCache(str(path))            # not imported again: nothing to skip this time
    assert reloaded.get("c")["text"] == "C" and reloaded.get("a")["text"] == "A" and reloaded.torn_lines == 0
    assert len(reloaded) == 2 and not reloaded.get("c")["truncated"]


def test_a_reply_is_durable_as_soon_as_it_is_stored(tmp_path):
    """Another process (here: another connection) sees a reply the moment put() returns: a kill -9 right after
    loses nothing that was finished."""
    writer = ResponseCache(str(tmp_path / "c.sqlite"))
    writer.put("k", "finished", 3, 4)
    reader = ResponseCache(str(tmp_path / "c.sqlite"))
    assert reader.get("k") == {"key": "k", "text": "finished", "prompt_tokens": 3, "completion_tokens": 4,
                               "truncated": False}
    writer.close()
    reader.close()


def test_a_ctrl_c_inside_a_request_task_leaves_no_traceback_behind(caplog):
    # Ctrl-C raised inside a running task: the task keeps the KeyboardInterrupt, and when it is collected asyncio
    # reports it ("Task exception was never retrieved", with a traceback) unless the client's handler drops it.
    client = ChatClient(["http://127.0.0.1:9/v1"], model="m")
    interrupted = []

    async def request():
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    async def pipeline():
        interrupted.append(asyncio.ensure_future(request()))
        await asyncio.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        client.run(pipeline())
    client.close()
    interrupted.clear()
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"]
    # Any other failure in the loop is still reported.
    client._loop.call_exception_handler({"message": "something else broke", "exception": ValueError("x")})
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else broke"]


@pytest.mark.parametrize("pieces, shown", [
    (["<thi", "nk>Let me ", "see.</th", "ink>\n\nThe ", "answer."], "The answer."),
    (["  <think>all of it thinking"], ""),
    (["<t"], "<t"),
    (["The <think> tag ", "in the middle stays."], "The <think> tag in the middle stays."),
    ([], ""),
])
def test_a_leading_think_block_is_not_streamed(pieces, shown):
    assert "".join(without_thinking(iter(pieces))) == shown


def test_replicas_take_one_out_and_bring_it_back_after_a_doubling_back_off():
    now = [0.0]
    replicas = Replicas(["http://a/v1", "http://b/v1"], ["http://a", "http://b"], clock=lambda: now[0])
    a, b = replicas.all
    assert [replicas.pick()[0] for _ in range(4)] == [a, b, a, b]
    assert replicas.failed(a, refused=True)                        # nothing listens there: out at once
    assert [replicas.pick()[0] for _ in range(3)] == [b, b, b]
    assert not replicas.failed(b, refused=False) and not replicas.failed(b, refused=False)
    assert replicas.failed(b, refused=False)                       # the third failure in a row
    assert replicas.pick() == (None, 2.0)                          # a comes back first, after 2 s
    now[0] = 2.0
    assert replicas.pick()[0] is a
    assert replicas.failed(a, refused=False)                       # back on trial: one failure takes it out again
    assert a.comes_back == 2.0 + 4.0                               # for twice as long
    now[0] = 6.0
    replicas.succeeded(a)
    assert a.streak == 0 and replicas.outages() == [
        "http://a: out of rotation 2 time(s), 6 s in all", "http://b: out of rotation 1 time(s), 6 s in all, still out at the end"]
