"""A scripted OpenAI-compatible server over real HTTP on 127.0.0.1, for fault injection and exact assertions.

Its default "model" answers deterministically from the prompt: a question request (no ##begin_quote## in the
prompt) gets a numbered list of questions about the document; an answer request gets a reasoning that quotes
the document's first sentence and ends with <ANSWER>:. A test replaces `script` to inject faults: the script
gets (request body, request number) and returns a Reply, or None for the default answer.
"""
import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


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
                 model_info: Optional[dict] = None):
        self.models = list(models)
        self.model_info = model_info or {}     # extra fields of every /models entry (vLLM's root, max_model_len)
        self.models_listed = True              # False: GET /models is a 404, as on some API gateways
        self.api_key = api_key                 # when set, other keys get 401
        self.delay = delay                     # added to every chat request (benchmarks)
        self.script: Callable[[dict, int], Optional[Reply]] = lambda body, n: None
        self.requests: list[dict] = []         # every chat request body, in arrival order
        self.in_flight = self.most_in_flight = 0   # chat requests being answered now, and the most at once
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

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

            def _send_stream(self, number, model, content, headers, piece_delay=0.0):
                """Server-sent events, a few characters per event, as an OpenAI-compatible server streams; with
                piece_delay, one event at a time (the connection then ends the stream)."""
                pieces = [content[i:i + 7] for i in range(0, len(content), 7)]
                chunk = lambda piece: {"id": f"cmpl-{number}", "object": "chat.completion.chunk", "model": model,
                                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                                    "finish_reason": None}]}
                events = [f"data: {json.dumps(chunk(piece))}\n\n" for piece in pieces] + ["data: [DONE]\n\n"]
                if not piece_delay:
                    return self._send(200, "".join(events).encode(), headers, content_type="text/event-stream")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for event in events:
                        self.wfile.write(event.encode())
                        self.wfile.flush()
                        time.sleep(piece_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _authorised(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, b'{"error": {"message": "invalid api key"}}')
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path == "/v1/models" and fake.models_listed:
                    data = [{"id": m, "object": "model", "created": int(time.time()), **fake.model_info}
                            for m in fake.models]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if body.get("model") not in fake.models:
                    return self._send(404, json.dumps({"error": {"message": f"The model `{body.get('model')}` does not exist."}}).encode())
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
                if reply.raw is not None or reply.status != 200:
                    return self._send(reply.status, reply.raw or b'{"error": "scripted"}', reply.headers)
                content = default_content(body) if reply.content is None else reply.content
                if body.get("stream"):
                    return self._send_stream(number, body["model"], content, reply.headers, reply.piece_delay)
                payload = {"id": f"cmpl-{number}", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                        "message": {"role": "assistant", "content": content}}],
                           "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                                     "completion_tokens": len(content) // 4,
                                     "total_tokens": len(json.dumps(body["messages"])) // 4 + len(content) // 4}}
                self._send(200, json.dumps(payload).encode(), reply.headers)

        return Handler

