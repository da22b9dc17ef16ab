"""A scripted OpenAI-compatible server over real HTTP on 127.0.0.1, for fault injection and exact assertions.

It speaks as one of the real servers (persona: vllm, openai, llamacpp, ollama, tgi; tests/personas.py says what each
was written from), or as the minimal "plain" server. Its default "model" answers deterministically from the prompt:
a question request (no ##begin_quote## in the prompt) gets a numbered list of questions about the document; an
answer request gets a reasoning that quotes the document's first sentence and ends with <ANSWER>:. A test replaces
`script` to inject faults: the script gets (request body, request number) and returns a Reply, or None for the
default answer.

  python -m tests.fake_server --port 8123 --persona vllm      # as a process of its own (a test kills it)
"""
import argparse
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from tests import personas

ERROR_KINDS = {400: "context_length", 401: "unauthorized", 404: "model_not_found", 429: "rate_limited",
               503: "overloaded"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512      # the stdlib default of 5 resets connections under concurrent load

    def handle_error(self, request, client_address):
        # A client that gives up closes its kept-alive connections (reset by peer): normal, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@dataclass
class Reply:
    status: int = 200
    content: Optional[str] = None     # chat message content; None = the default model's answer
    headers: dict = field(default_factory=dict)
    raw: Optional[bytes] = None       # a body sent as is (garbage, truncated JSON)
    delay: float = 0.0                # seconds before answering (a hanging request)
    finish_reason: str = "stop"       # "length": the reply was cut at max_tokens
    piece_delay: float = 0.0          # streaming: seconds between events (a reply written slowly)
    reasoning: Optional[str] = None   # a reasoning model's thinking, in the persona's own field
    no_content: bool = False          # content null: the reply was cut inside the thinking (vLLM's reasoning parser)


def document_of(body: dict) -> str:
    text = "\n".join(m["content"] for m in body["messages"])
    documents = re.findall(r"<DOCUMENT>(.*?)</DOCUMENT>", text, re.S)
    return documents[-1].strip() if documents else text      # the last one: a prompt may open with an example


def default_content(body: dict) -> str:
    doc = document_of(body)
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9\-.]*", doc)
    if "##begin_quote##" not in json.dumps(body["messages"]):
        topics = [" ".join(words[i:i + 3]) for i in range(0, min(len(words), 30), 6)]
        return "Here are the questions:\n" + "\n".join(f"{n}. What does the guide say about {t}?"
                                                      for n, t in enumerate(topics, 1))
    first_sentence = re.split(r"(?<=[.!?])\s", doc, maxsplit=1)[0]
    return (f"The document answers this directly. ##begin_quote## {first_sentence} ##end_quote## "
            f"So the answer follows.\n<ANSWER>: {' '.join(words[:6])}")


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FakeOpenAI:
    def __init__(self, models=("teacher",), api_key: Optional[str] = None, delay: float = 0.0,
                 model_info: Optional[dict] = None, persona: str = "plain", port: int = 0,
                 model_path: str = "/models/teacher.gguf"):
        assert persona == "plain" or persona in personas.PERSONAS, persona
        self.models = list(models)
        self.persona = persona
        self.model_info = model_info or {}     # extra fields of every /models entry (vLLM's root, max_model_len)
        self.model_path = model_path           # llama.cpp's /props: the model file it loaded
        self.models_listed = True              # False: GET /models is a 404, as on some API gateways
        self.api_key = api_key                 # when set, other keys get 401
        self.delay = delay                     # added to every chat request (benchmarks)
        self.script: Callable[[dict, int], Optional[Reply]] = lambda body, n: None
        self.requests: list[dict] = []         # every chat request body, in arrival order
        self.in_flight = self.most_in_flight = 0   # chat requests being answered now, and the most at once
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def error(self, status: int, message: str) -> tuple[int, bytes, dict]:
        status, body, headers = personas.error(self.persona, status, ERROR_KINDS.get(status, "server_error"), message)
        return status, json.dumps(body).encode(), headers

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"     # keep-alive, like a real server
            disable_nagle_algorithm = True     # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):
                pass

            def _send(self, status, payload: bytes, headers=None, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass      # the client gave up (a timeout test)

            def _send_json(self, status, value, headers=None):
                self._send(status, json.dumps(value).encode(), headers)

            def _send_error(self, status, message):
                self._send(*fake.error(status, message))

            def _send_stream(self, number, body, content, reply: Reply):
                """Server-sent events, a few characters per event, as the persona streams; with piece_delay, one
                event at a time (the connection then ends the stream)."""
                pieces = [] if reply.no_content else [content[i:i + 7] for i in range(0, len(content), 7)]
                counts = (len(json.dumps(body["messages"])) // 4, len(content) // 4)
                chunks = personas.stream_chunks(fake.persona, number, body["model"], pieces, reply.reasoning,
                                                reply.finish_reason, counts, personas.wants_usage(fake.persona, body))
                if fake.persona == "plain":    # the minimal server: role in every delta, no role-only first chunk
                    chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
                events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
                if not reply.piece_delay:
                    return self._send(200, "".join(events).encode(), reply.headers, content_type="text/event-stream")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for event in events:
                        self.wfile.write(event.encode())
                        self.wfile.flush()
                        time.sleep(reply.piece_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _authorised(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send_error(401, "Incorrect API key provided")
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path == "/v1/models" and fake.models_listed:
                    entries = [personas.model_entry(fake.persona, m, fake.model_info) for m in fake.models]
                    self._send_json(200, personas.listing(fake.persona, entries))
                elif self.path == "/props" and fake.persona == "llamacpp":
                    self._send_json(200, personas.props(fake.model_path))
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if body.get("model") not in fake.models and fake.persona != "llamacpp":   # llama.cpp takes any name
                    status, error, headers = personas.model_not_found(fake.persona, body.get("model"))
                    return self._send_json(status, error, headers)
                with fake.lock:
                    number = len(fake.requests)
                    fake.requests.append(body)
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                try:
                    self._answer(body, number)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _answer(self, body, number):
                reply = fake.script(body, number) or Reply()
                time.sleep(reply.delay + fake.delay)
                if reply.raw is not None:
                    return self._send(reply.status, reply.raw, reply.headers)
                if reply.status != 200:
                    status, payload, headers = fake.error(reply.status, "scripted failure")
                    return self._send(status, payload, {**headers, **reply.headers})
                content = default_content(body) if reply.content is None else reply.content
                if body.get("stream"):
                    return self._send_stream(number, body, content, reply)
                counts = (len(json.dumps(body["messages"])) // 4, len(content) // 4)
                payload = personas.completion(fake.persona, number, body["model"],
                                              None if reply.no_content else content, reply.reasoning,
                                              reply.finish_reason, counts)
                self._send_json(200, payload, reply.headers)

        return Handler


def main():
    p = argparse.ArgumentParser(description="the scripted server as a process of its own, until it is killed")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--persona", default="plain")
    p.add_argument("--model", default="teacher")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before every chat reply")
    args = p.parse_args()
    with FakeOpenAI(models=(args.model,), persona=args.persona, port=args.port, delay=args.delay) as fake:
        print(f"serving {fake.url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
