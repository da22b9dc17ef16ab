"""An OpenAI-compatible RAG endpoint: any OpenAI client (the openai package, curl, LangChain) asks the fine-tuned
model about the documents, unchanged.

  python chat.py -u http://localhost:8000/v1 --serve --port 8090 [--server_api_key KEY]
  curl http://127.0.0.1:8090/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "raft-8b", "messages": [{"role": "user", "content": "Which port does vLLM use?"}]}'

GET /v1/models lists the one model. POST /v1/chat/completions retrieves for the last user message, fills the RAG
prompt and asks the model, as chat.py does; `temperature` and `max_tokens` of the request are honoured (max_tokens
up to request_max_tokens). The reply's content is the answer part (after <ANSWER>:), and the response carries three
more fields: "sources" (rank, source file, chunk text), "handoff" (true when the model declined: a person should
take over), "reasoning" (the whole reply, chain of thought included), "quote_support" (the share of the reply's
##begin_quote## spans found word for word in the sources; null without a quote) and "unquoted" (true when nothing
of an answer is quoted from its sources: check it against them). With "stream": true the answer comes as
server-sent events while it is written, these fields in the last event. Earlier turns of the conversation are
not sent to the model: a RAFT model answers one question from its documents, as it was trained to.

What it refuses, each in OpenAI's error shape, and why (the limits are keys of raft_eval_config.yaml, with flags):
- 403 a Host header other than the bound address, localhost or --allowed_hosts (DNS rebinding: a web page the user
  visits must not reach the documents through a name that resolves to this machine), and a browser Origin not in
  --allowed_origins (CORS headers go to those origins only);
- 401 a missing or wrong key, when --server_api_key or RAG_SERVER_API_KEY sets one;
- 415 a POST body that is not application/json (a browser can send text/plain with no preflight);
- 413 a body over max_request_bytes; 400 a question over max_question_chars or more than max_messages messages;
- 429 with Retry-After when concurrency answers are being written and queue_size requests wait, or a request has
  waited queue_wait seconds;
- 500 (the model in this process failed) and 502 (the model server failed) end that request only, with no host,
  port or upstream message in them: those go to this server's log, under the response's id.
A client that disconnects stops its answer and frees its slot within a second.
"""
import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from assistant import Assistant
from errors import LLMFatalError

RETRY_AFTER_SECONDS = 2
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class BadRequest(Exception):
    def __init__(self, message: str, param: str = None, status: int = 400, code: str = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how many may be served at once (raft_eval_config.yaml's serving keys)."""
    concurrency: int
    queue_size: int
    queue_wait: float
    max_request_bytes: int
    max_question_chars: int
    max_messages: int
    request_max_tokens: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Limits":
        return cls(**{name: cfg[name] for name in cls.__dataclass_fields__})


def error_response(status: int, message: str, kind: str, param: str = None, code: str = None,
                   headers: dict = None) -> web.Response:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


def read_request(body, served_name: str, limits: Limits) -> tuple[str, dict, bool]:
    """(the last user message, model parameters, streaming) of a chat completion request, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_name:
        raise BadRequest(f"The model `{model}` does not exist: this endpoint serves `{served_name}`", "model", 404,
                         "model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"'messages' holds {len(messages)} messages: at most {limits.max_messages} are accepted",
                         "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str) or not users[-1]["content"].strip():
        raise BadRequest("'messages' needs a user message with text content: its last one is the question",
                         "messages")
    question = users[-1]["content"].strip()
    if len(question) > limits.max_question_chars:
        raise BadRequest(f"the question has {len(question)} characters: at most {limits.max_question_chars} are "
                         "accepted", "messages")
    return question, read_parameters(body, limits), bool(body.get("stream"))


def read_parameters(body: dict, limits: Limits) -> dict:
    params = {}
    if body.get("temperature") is not None:
        if not isinstance(body["temperature"], (int, float)) or not 0 <= body["temperature"] <= 2:
            raise BadRequest("'temperature' must be a number between 0 and 2", "temperature")
        params["temperature"] = float(body["temperature"])
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest("'max_tokens' must be a whole number of 1 or more", "max_tokens")
        params["max_tokens"] = min(limit, limits.request_max_tokens)
    return params


def host_names(bound: str, extra: list[str]) -> set[str]:
    """The names a request's Host header may carry: the bound address, localhost, the machine's own names when bound
    to every interface, and the ones given."""
    names = {bound, *LOOPBACK_NAMES, *extra}
    if bound in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname(), socket.getfqdn()}
    return {name.lower() for name in names}


def host_of(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8090" -> "::1")."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


class Admission:
    """At most `concurrency` answers in progress and `queue_size` requests waiting for one; a request beyond that,
    or one that waited `queue_wait` seconds, is turned away (429)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.concurrency)
        self.waiting = 0

    async def enter(self) -> bool:
        if self.slots.locked() and self.waiting >= self.limits.queue_size:
            return False
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.limits.queue_wait)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiting -= 1

    def leave(self):
        self.slots.release()


def client_gone(request) -> bool:
    return request.transport is None or request.transport.is_closing()


class RagServer:
    def __init__(self, assistant: Assistant, model, api_key: str, limits: Limits, hosts: set[str],
                 origins: list[str]):
        self.assistant, self.model, self.api_key, self.limits = assistant, model, api_key, limits
        self.hosts, self.origins = hosts, set(origins)
        self.pool = ThreadPoolExecutor(max_workers=limits.concurrency)   # the model and retrieval calls block
        self.admission = None            # made inside the server's event loop (on_startup)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=self.limits.max_request_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_route("OPTIONS", "/v1/{tail:.*}", self.preflight)

        async def start(_):
            self.admission = Admission(self.limits)
        app.on_startup.append(start)
        return app

    # ---- who may call ------------------------------------------------------------------------------------------
    @web.middleware
    async def guard(self, request, handler):
        """The Host, the Origin, the key and the body's type and size, before any work."""
        if host_of(request.headers.get("Host", "")) not in self.hosts:
            return error_response(403, "this server is not addressed by that host name (start it with "
                                  "--allowed_hosts to add one)", "invalid_request_error", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.origins:
            return error_response(403, "requests from this web origin are not allowed (start the server with "
                                  "--allowed_origins to add it)", "invalid_request_error", code="origin_not_allowed")
        if request.method == "OPTIONS":
            return self.with_cors(await handler(request), origin)
        if self.api_key and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                                    f"Bearer {self.api_key}".encode()):
            return self.with_cors(error_response(401, "Incorrect or missing API key: send it as 'Authorization: "
                                                 "Bearer KEY'", "invalid_request_error", code="invalid_api_key"), origin)
        if request.method == "POST":
            problem = self.body_problem(request)
            if problem:
                return self.with_cors(problem, origin)
        return self.with_cors(await handler(request), origin)

    def body_problem(self, request):
        if request.content_type != "application/json":
            return error_response(415, "the body must be JSON, sent with 'Content-Type: application/json'",
                                  "invalid_request_error", code="unsupported_media_type")
        if (request.content_length or 0) > self.limits.max_request_bytes:
            return self.too_large()
        return None

    def too_large(self) -> web.Response:
        return error_response(413, f"the body is larger than {self.limits.max_request_bytes} bytes",
                              "invalid_request_error", code="request_too_large")

    def with_cors(self, response, origin):
        if origin is not None:          # an allowed origin (guard refused the others)
            response.headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
        return response

    async def preflight(self, request):
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                 "Access-Control-Allow-Headers": "Authorization, Content-Type",
                                                 "Access-Control-Max-Age": "600"})

    # ---- answers -------------------------------------------------------------------------------------------------
    async def models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": 0, "owned_by": "raft-toolkit"}]})

    async def chat(self, request):
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return self.too_large()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the body is not valid JSON", "invalid_request_error")
        try:
            question, params, stream = read_request(body, self.model.name, self.limits)
        except BadRequest as e:
            return error_response(e.status, e.message, "invalid_request_error", e.param, e.code)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model.name}
        if not await self.admission.enter():
            return error_response(429, "the chat is busy: try again in a moment", "rate_limit_error",
                                  code="busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        try:
            return await (self.stream(request, question, params, meta) if stream
                          else self.complete(request, question, params, meta))
        finally:
            self.admission.leave()

    def answer(self, question: str, params: dict, cancel: threading.Event, on_text=None) -> dict:
        """Retrieval, the model's reply and the result, in a worker thread; on_text(visible answer) as it grows.
        Stops at the next piece once `cancel` is set (the client went away)."""
        turn = self.assistant.start(question)
        pieces = self.assistant.stream(turn, self.model, params)
        try:
            for _ in pieces:
                if cancel.is_set():
                    break
                if on_text:
                    on_text(turn.visible(show_reasoning=False))
        finally:
            pieces.close()                  # stops the model's generation (or its server stream) at once
        if on_text:
            on_text(turn.visible(show_reasoning=False, finished=True))
        return self.assistant.finish(turn)

    @staticmethod
    def extras(result: dict) -> dict:
        return {"sources": result["sources"], "handoff": result["handoff"], "reasoning": result["reply"],
                "quote_support": result["quote_support"], "unquoted": result["unquoted"]}

    def failure(self, error: BaseException, meta: dict) -> tuple[int, str, str]:
        """(status, message, type) of a failed answer for the client; the details go to this server's log."""
        print(f"error in {meta['id']}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if isinstance(error, LLMFatalError):
            return 502, f"the model server failed to answer (this server's log has the details, {meta['id']})", \
                "server_error"
        return 500, f"the model failed to answer (this server's log has the details, {meta['id']})", "server_error"

    async def complete(self, request, question, params, meta):
        cancel = threading.Event()
        work = asyncio.get_running_loop().run_in_executor(self.pool, self.answer, question, params, cancel)
        while not work.done():              # the client may go away while the answer is written
            await asyncio.wait({work}, timeout=0.25)
            if client_gone(request):
                cancel.set()
        try:
            result = work.result()
        except Exception as e:              # noqa: BLE001 -- the request ends, not the server
            status, message, kind = self.failure(e, meta)
            return error_response(status, message, kind)
        return web.json_response({**meta, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": result["answer"]}, "finish_reason": "stop"}],
            **self.extras(result)})

    async def stream(self, request, question, params, meta):
        """Server-sent events: the answer part as it grows, then the extra fields, then [DONE]."""
        loop, updates, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        work = loop.run_in_executor(self.pool, self.answer, question, params, cancel,
                                    lambda text: loop.call_soon_threadsafe(updates.put_nowait, text))
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(updates.put_nowait, None))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await self.send_events(request, response, updates, meta, cancel)
            await self.send_end(response, work, meta)
        except ConnectionError:
            cancel.set()                    # the client went away mid-stream: stop its answer
        await asyncio.wait({work})          # the slot is freed once the worker has stopped
        return response

    async def send_events(self, request, response, updates, meta, cancel):
        await response.write(self.event(meta, {"role": "assistant", "content": ""}))
        shown = ""
        while True:
            try:
                text = await asyncio.wait_for(updates.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if client_gone(request):
                    raise ConnectionResetError("the client went away") from None
                continue
            if text is None:
                return
            if len(text) > len(shown):
                await response.write(self.event(meta, {"content": text[len(shown):]}))
                shown = text

    async def send_end(self, response, work, meta):
        try:
            result = work.result()
        except Exception as e:              # noqa: BLE001 -- the request ends, not the server
            _, message, kind = self.failure(e, meta)
            error = {"error": {"message": message, "type": kind, "param": None, "code": None}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        else:
            await response.write(self.event(meta, {}, "stop", **self.extras(result)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()

    @staticmethod
    def event(meta, delta: dict, finish=None, **extra) -> bytes:
        chunk = {**meta, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def serve(assistant: Assistant, model, args, cfg: dict, api_key) -> int:
    port = args.port or 8090
    server = RagServer(assistant, model, api_key, Limits.from_config(cfg),
                       host_names(args.host, cfg["allowed_hosts"]), cfg["allowed_origins"])
    print(f"RAG endpoint for {model.name} ({model.where}; {assistant.describe()}) at http://{args.host}:{port}/v1"
          + (" (an API key is required)" if api_key else "") + "; Ctrl-C stops it", flush=True)
    web.run_app(server.app(), host=args.host, port=port, print=None, access_log=None)
    return 0
