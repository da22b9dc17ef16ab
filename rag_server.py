"""An OpenAI-compatible RAG endpoint: any OpenAI client (the openai package, curl, LangChain) asks the fine-tuned
model about the documents, unchanged.

  python chat.py -u http://localhost:8000/v1 --serve --port 8090 [--server_api_key KEY]
  curl http://127.0.0.1:8090/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "raft-8b", "messages": [{"role": "user", "content": "Which port does vLLM use?"}]}'

GET /v1/models lists the one model. POST /v1/chat/completions retrieves for the last user message, fills the RAG
prompt and asks the model, as chat.py does; `temperature` and `max_tokens` of the request are honoured. The
reply's content is the answer part (after <ANSWER>:), and the response carries three more fields: "sources"
(rank, source file, chunk text), "handoff" (true when the model declined: a person should take over) and
"reasoning" (the whole reply, chain of thought included). With "stream": true the answer comes as server-sent
events while it is written, the three fields in the last event. Earlier turns of the conversation are not sent
to the model: a RAFT model answers one question from its documents, as it was trained to.

A missing or wrong key (when --server_api_key or RAG_SERVER_API_KEY sets one) gets 401, a malformed request 400,
an unknown model 404, a failing model server 502, all in OpenAI's error shape. --concurrency answers are written
at once; further requests wait their turn.
"""
import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from assistant import Assistant
from errors import LLMFatalError

EXTRA_FIELDS = ("sources", "handoff", "reasoning")


class BadRequest(Exception):
    def __init__(self, message: str, param: str = None, status: int = 400, code: str = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(status: int, message: str, kind: str, param: str = None, code: str = None) -> web.Response:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def read_request(body, served_name: str) -> tuple[str, dict, bool]:
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
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str) or not users[-1]["content"].strip():
        raise BadRequest("'messages' needs a user message with text content: its last one is the question",
                         "messages")
    params = {}
    if body.get("temperature") is not None:
        if not isinstance(body["temperature"], (int, float)) or not 0 <= body["temperature"] <= 2:
            raise BadRequest("'temperature' must be a number between 0 and 2", "temperature")
        params["temperature"] = float(body["temperature"])
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadRequest("'max_tokens' must be a whole number of 1 or more", "max_tokens")
        params["max_tokens"] = limit
    return users[-1]["content"].strip(), params, bool(body.get("stream"))


class RagServer:
    def __init__(self, assistant: Assistant, model, api_key: str, concurrency: int):
        self.assistant, self.model, self.api_key = assistant, model, api_key
        self.pool = ThreadPoolExecutor(max_workers=concurrency)     # the model and retrieval calls are blocking

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.authorise])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    @web.middleware
    async def authorise(self, request, handler):
        if self.api_key:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
                return error_response(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                                      "invalid_request_error", code="invalid_api_key")
        return await handler(request)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model.name, "object": "model", "created": 0, "owned_by": "raft-toolkit"}]})

    async def chat(self, request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the body is not valid JSON", "invalid_request_error")
        try:
            question, params, stream = read_request(body, self.model.name)
        except BadRequest as e:
            return error_response(e.status, e.message, "invalid_request_error", e.param, e.code)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model.name}
        return await (self.stream(request, question, params, meta) if stream else self.complete(question, params, meta))

    def answer(self, question: str, params: dict, on_text=None) -> dict:
        """Retrieval, the model's reply and the result, in a worker thread; on_text(visible answer) as it grows."""
        turn = self.assistant.start(question)
        for _ in self.assistant.stream(turn, self.model, params):
            if on_text:
                on_text(turn.visible(show_reasoning=False))
        if on_text:
            on_text(turn.visible(show_reasoning=False, finished=True))
        return self.assistant.finish(turn)

    @staticmethod
    def extras(result: dict) -> dict:
        return {"sources": result["sources"], "handoff": result["handoff"], "reasoning": result["reply"]}

    async def complete(self, question, params, meta):
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.pool, self.answer, question, params)
        except LLMFatalError as e:
            return error_response(502, f"the model server failed: {e}", "server_error")
        return web.json_response({**meta, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": result["answer"]}, "finish_reason": "stop"}],
            **self.extras(result)})

    async def stream(self, request, question, params, meta):
        """Server-sent events: the answer part as it grows, then the extra fields, then [DONE]."""
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        work = loop.run_in_executor(self.pool, self.answer, question, params,
                                    lambda text: loop.call_soon_threadsafe(updates.put_nowait, text))
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(updates.put_nowait, None))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(delta: dict, finish=None, **extra):
            chunk = {**meta, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        shown = ""
        while (text := await updates.get()) is not None:
            if len(text) > len(shown):
                await send({"content": text[len(shown):]})
                shown = text
        try:
            result = work.result()
        except LLMFatalError as e:
            error = {"error": {"message": f"the model server failed: {e}", "type": "server_error", "param": None,
                               "code": None}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        else:
            await send({}, "stop", **self.extras(result))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def serve(assistant: Assistant, model, args, api_key) -> int:
    port = args.port or 8090
    server = RagServer(assistant, model, api_key, args.concurrency)
    print(f"RAG endpoint for {model.name} ({model.where}; {assistant.describe()}) at http://{args.host}:{port}/v1"
          + (" (an API key is required)" if api_key else "") + "; Ctrl-C stops it", flush=True)
    web.run_app(server.app(), host=args.host, port=port, print=None, access_log=None)
    return 0
