"""The RAG endpoint (chat.py --serve) through the openai package, unchanged: completions streamed and not, the
sources and hand-off in extra fields, 401 for a wrong key, 400 for a malformed request, and 16 requests at once."""
import concurrent.futures

import httpx
import openai
import pytest

from tests.fake_server import FakeOpenAI, Reply
from tests.test_chat_web import ANSWER, COT, REFUSAL, free_port, running_chat, scripted as web_scripted

KEY = "rag-secret"


def scripted(body, n):
    """The web chat's scripted model, each answer taking 0.3 s."""
    return web_scripted(body, n, answer=Reply(content=COT, delay=0.3))


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    with FakeOpenAI(models=("raft-student",)) as fake:
        fake.script = scripted
        with running_chat(fake, port, "--serve", "--concurrency", "16", env={"RAG_SERVER_API_KEY": KEY}):
            yield f"http://127.0.0.1:{port}/v1", fake


def client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0)


def test_models_and_a_completion_with_its_sources(endpoint):
    url, _ = endpoint
    assert [m.id for m in client(url).models.list().data] == ["raft-student"]
    reply = client(url).chat.completions.create(
        model="raft-student", messages=[{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "Which port does vLLM listen on?"}])
    assert reply.choices[0].message.content == ANSWER and reply.choices[0].finish_reason == "stop"
    extra = reply.model_extra
    assert extra["handoff"] is False and extra["reasoning"] == COT
    assert extra["quote_support"] in (0.0, 1.0) and extra["unquoted"] is (extra["quote_support"] == 0.0)
    assert len(extra["sources"]) == 3 and extra["sources"][0]["source"].endswith("serving_llama.html")
    assert {"rank", "source", "text"} == set(extra["sources"][0])


def test_streaming_sends_the_answer_in_pieces_then_the_extra_fields(endpoint):
    url, _ = endpoint
    stream = client(url).chat.completions.create(
        model="raft-student", stream=True, messages=[{"role": "user", "content": "Which port does vLLM listen on?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == ANSWER and sum(bool(c.choices[0].delta.content) for c in chunks) >= 1
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["handoff"] is False
    assert len(chunks[-1].model_extra["sources"]) == 3


def test_a_refusal_is_flagged_as_a_handoff(endpoint):
    url, _ = endpoint
    reply = client(url).chat.completions.create(
        model="raft-student", messages=[{"role": "user", "content": "What will the weather be tomorrow?"}])
    assert reply.model_extra["handoff"] is True and reply.choices[0].message.content == REFUSAL


def test_a_wrong_or_missing_key_gets_401(endpoint):
    url, _ = endpoint
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(url, key="nope").chat.completions.create(model="raft-student",
                                                         messages=[{"role": "user", "content": "hi?"}])
    assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
    assert httpx.get(url + "/models").status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"model": "raft-student", "messages": []}, "messages"),
    ({"model": "raft-student", "messages": [{"role": "assistant", "content": "hello"}]}, "messages"),
    ({"model": "raft-student", "messages": [{"role": "user", "content": "q?"}], "temperature": "hot"}, "temperature"),
    ({"model": "raft-student", "messages": [{"role": "user", "content": "q?"}], "max_tokens": 0}, "max_tokens")])
def test_a_malformed_request_gets_400_in_openais_shape(endpoint, body, param):
    url, _ = endpoint
    with pytest.raises(openai.BadRequestError) as bad:
        client(url).chat.completions.create(**body)
    assert bad.value.status_code == 400 and bad.value.body["param"] == param and bad.value.body["type"] == \
        "invalid_request_error"
    raw = httpx.post(url + "/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                           "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "the body is not valid JSON"


def test_an_unknown_model_is_404_and_a_failing_model_server_502(endpoint):
    url, _ = endpoint
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "q?"}])
    with pytest.raises(openai.InternalServerError) as failed:
        client(url).chat.completions.create(model="raft-student",
                                            messages=[{"role": "user", "content": "Why does it crash?"}])
    assert failed.value.status_code == 502 and "model server failed" in failed.value.body["message"]


def test_sixteen_requests_at_once_are_all_answered_together(endpoint):
    """The scripted model takes 0.3 s a reply: the endpoint must have them all in flight at once."""
    url, fake = endpoint
    before = len(fake.requests)
    fake.most_in_flight = 0
    ask = lambda i: client(url).chat.completions.create(
        model="raft-student", messages=[{"role": "user", "content": f"Which port does vLLM listen on, case {i}?"}])
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(16)))
    assert all(r.choices[0].message.content == ANSWER for r in replies)
    assert len(fake.requests) - before == 16 and fake.most_in_flight >= 12
