"""The OpenAI-compatible chat client shared by raft.py, raft_eval.py and chat.py.

What it adds to a plain HTTP call, and why:
- a bound on requests in flight, spread round-robin over one or more server replicas (-u given several times); a
  replica that refuses connections or keeps failing is taken out of rotation for a while (replicas.py), and its
  requests go to the others;
- retries with exponential backoff and jitter on 408, 429, 5xx, timeouts, connection errors, garbled bodies and
  empty replies, waiting as long as a well-formed Retry-After header asks; a request that keeps getting 429
  waits up to rate_limit_wait seconds in all before it is dropped;
- fail-fast errors for what a retry cannot fix (a rejected API key, an unknown model, an unreachable server);
- optional requests-per-minute and tokens-per-minute limits, for cloud plans: every attempt, retries included,
  takes its place in them;
- an on-disk cache (SQLite, reply_cache.py) keyed by a hash of (model, messages, parameters, the model's
  fingerprint: identify_model()): a re-run, or a run resumed after Ctrl-C or kill -9, sends only the requests that
  never completed, and another model served under the same name is asked again;
- replies of reasoning models (vLLM's --reasoning-parser, llama.cpp, Ollama): the thinking (reasoning_content,
  reasoning, a leading <think> block) is never taken as the answer, and a reply cut inside it is a truncated one;
- requests by priority (complete(..., priority)): raft.py asks a chunk's answers before new chunks' questions;
- streaming of one reply as it is written (stream()), for the chatbot.
"""
import asyncio
import collections
import email.utils
import hashlib
import heapq
import itertools
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence
from urllib.parse import urlsplit

import aiohttp
from tqdm import tqdm

from errors import LLMFatalError, ServerUnreachable
from replicas import Replica, Replicas
from reply_cache import ResponseCache, cache_key

# What a /models entry (and llama.cpp's /props) says about the weights behind a name: the model's fingerprint keeps
# these and drops what describes the call (vLLM's per-call permission ids, llama.cpp's listing time, ...).
DESCRIBES_THE_WEIGHTS = ("id", "root", "parent", "max_model_len", "meta", "props_model_path")
_THINKING = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


@dataclass
class ChatResult:
    text: Optional[str]            # None when the request failed for good
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    error: Optional[str] = None    # why it failed, when text is None
    truncated: bool = False        # the server stopped at max_tokens (finish_reason "length"): not a whole reply


@dataclass
class UsageTotals:
    sent: int = 0                  # requests answered by a server in this run
    cached: int = 0                # requests answered from the cache
    failed: int = 0
    retries: int = 0
    truncated: int = 0             # replies cut at max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0


def public_host(url: str) -> str:
    """scheme://host:port of a URL, without credentials, path or query: safe to log and to store."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


class PriorityGate:
    """At most `slots` holders at once; a waiter with a lower priority number goes first, then first come, first
    served. raft.py gives a chunk's answers priority over further chunks' questions, so the answers of the first
    chunks are asked while later chunks' questions are still coming back (no barrier between the stages)."""

    def __init__(self, slots: int):
        self.free = slots
        self.waiting: list = []          # heap of (priority, arrival, future)
        self.arrivals = itertools.count()

    async def acquire(self, priority: int = 0):
        if self.free and not self.waiting:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (priority, next(self.arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()           # it was handed the slot just as it was cancelled: pass it on
            raise

    def release(self):
        while self.waiting:
            _, _, future = heapq.heappop(self.waiting)
            if not future.done():
                future.set_result(None)      # the slot goes straight to this waiter
                return
        self.free += 1


class RateLimiter:
    """Sliding windows of `period` seconds (a minute) over request starts (rpm) and tokens (tpm); 0 disables a
    limit. Tokens are reserved with an estimate when a request starts and corrected with the real usage."""

    def __init__(self, rpm: int, tpm: int, period: float = 60.0):
        self.rpm, self.tpm, self.period = rpm, tpm, period
        self.active = bool(rpm or tpm)
        self.window: collections.deque = collections.deque()    # [start_time, tokens] entries
        self.lock = asyncio.Lock()

    async def acquire(self, estimate_tokens) -> Optional[list]:
        """Wait for room in both windows; `estimate_tokens()` is only called when a limit is set."""
        if not self.active:
            return None
        estimated_tokens = estimate_tokens()
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.window and now - self.window[0][0] >= self.period:
                    self.window.popleft()
                used = sum(entry[1] for entry in self.window)
                over_rpm = self.rpm and len(self.window) >= self.rpm
                over_tpm = self.tpm and self.window and used + estimated_tokens > self.tpm
                if not (over_rpm or over_tpm):
                    entry = [now, estimated_tokens]
                    self.window.append(entry)
                    return entry
                await asyncio.sleep(self.period - (now - self.window[0][0]) + 0.01)

    @staticmethod
    def settle(entry: Optional[list], real_tokens: int):
        if entry is not None:
            entry[1] = real_tokens


def retry_after_seconds(headers) -> Optional[float]:
    """The wait a Retry-After header asks for (seconds or an HTTP date); None when absent or malformed, in which
    case the client's own backoff applies."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)   # the HTTP-date form
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Failed(Exception):
    """This one request cannot be answered (after retries, or at once for a 4xx): it is counted, not fatal."""
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Retry(_Failed):
    """A failure worth retrying, after `wait` seconds if the server said how long."""
    def __init__(self, reason: str, wait: Optional[float] = None, rate_limited: bool = False):
        super().__init__(reason)
        self.wait = wait
        self.rate_limited = rate_limited      # a 429: retried within rate_limit_wait, not max_retries


def quiet_after_ctrl_c(loop: asyncio.AbstractEventLoop, context: dict):
    """The event loop's exception handler. Ctrl-C lands in whichever request task is running: that task keeps the
    KeyboardInterrupt, and asyncio would print it as "Task exception was never retrieved", with a traceback, when
    the task is collected. The interruption is the caller's to report (once, in one line); the rest as usual."""
    if not isinstance(context.get("exception"), KeyboardInterrupt):
        loop.default_exception_handler(context)


def without_thinking(pieces: Iterator[str]) -> Iterator[str]:
    """A streamed reply's pieces without a leading <think> block (a reasoning model behind a server that does not
    parse reasoning, such as TGI): held back while the reply could still open one, dropped up to its end."""
    held = ""
    for piece in pieces:
        held += piece
        head = held.lstrip()
        if head.startswith("<think>"):
            end = head.find("</think>")
            if end < 0:
                continue
            rest = head[end + len("</think>"):].lstrip()
        elif "<think>".startswith(head):
            continue                     # "<th" may still become "<think>"
        else:
            rest = held
        if rest:
            yield rest
        yield from pieces
        return
    if held and not held.lstrip().startswith("<think>"):
        yield held                       # a reply shorter than "<think>" (all of it thinking: nothing)


@dataclass
class ChatClient:
    urls: Sequence[str]
    api_key: str = field(default="EMPTY", repr=False)   # never printed
    model: str = ""
    max_in_flight: int = 32
    timeout: float = 600.0
    max_retries: int = 6
    rpm: int = 0
    tpm: int = 0
    rate_limit_wait: float = 600.0  # seconds one request may spend waiting out 429s before it is dropped
    cache_path: Optional[str] = None
    fingerprint: str = ""           # mixed into the cache keys: see cache_key
    backoff_base: float = 1.0       # first retry waits about this long, then doubling ...
    backoff_max: float = 60.0       # ... up to this
    usage: UsageTotals = field(default_factory=UsageTotals)

    def __post_init__(self):
        if not self.urls:
            raise LLMFatalError("no endpoint given: pass the server's base URL with -u, e.g. http://localhost:8001/v1")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.cache = ResponseCache(self.cache_path) if self.cache_path else None
        self.replicas = Replicas(self.urls, [public_host(u) for u in self.urls])
        self._unfingerprinted_keys = False     # whether an earlier version's cache answers this model too
        self._served: dict[str, dict[str, dict]] = {}     # url -> model id -> its /models entry (preflight)
        self._limiter = RateLimiter(self.rpm, self.tpm)
        self._gate = PriorityGate(self.max_in_flight)
        # One event loop and one HTTP session for the client's life: connections opened by one stage
        # (questions) are reused by the next (answers, retries) instead of being opened again.
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(quiet_after_ctrl_c)
        self._http: Optional[aiohttp.ClientSession] = None

    # ---- public, synchronous entry points -------------------------------------------------------
    def preflight(self) -> str:
        """Check every endpoint and the model before any work; returns the model name to use."""
        return self._loop.run_until_complete(self._preflight(self._session()))

    def complete_all(self, requests: Sequence[tuple[list, dict]], desc: str) -> list[ChatResult]:
        """Answer (messages, params) requests concurrently; results come back in request order."""
        return self._loop.run_until_complete(self._complete_all(requests, desc))

    def run(self, coroutine):
        """Run a coroutine that awaits complete() on the client's event loop (raft.py's pipeline)."""
        return self._loop.run_until_complete(coroutine)

    async def complete(self, messages: list, params: dict, priority: int = 0) -> ChatResult:
        """One request, from the cache or through a free slot (of max_in_flight; a lower priority number is
        served first). A failure after the retries comes back as a ChatResult without text."""
        key = cache_key(self.model, messages, params, self.fingerprint) if self.cache is not None else None
        hit = self.cache.get(key) if self.cache is not None else None
        if not hit and self._unfingerprinted_keys:
            hit = self.cache.get(cache_key(self.model, messages, params))
        if hit:
            self.usage.cached += 1
            return ChatResult(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], cached=True,
                              truncated=hit["truncated"])
        await self._gate.acquire(priority)
        try:
            return await self._complete_one(self._session_now(), key, messages, params)
        finally:
            self._gate.release()

    def stream(self, messages: list, params: dict) -> Iterator[str]:
        """One reply, piece by piece as the server writes it (stream=true). A single try, not cached: a person is
        reading, and a retry would repeat what they have already seen. Failures raise LLMFatalError."""
        pieces = self._stream(self._session(), messages, params)

        def each_piece():
            try:
                while True:
                    yield self._loop.run_until_complete(pieces.__anext__())
            except StopAsyncIteration:
                return
        try:
            yield from without_thinking(each_piece())
        finally:
            async def settle():
                # After Ctrl-C the read in progress is still scheduled: cancel it, then close the stream.
                pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await pieces.aclose()
            self._loop.run_until_complete(settle())

    def close(self):
        """Cancel what is still in flight (after Ctrl-C), close the connections and the cache. Closing twice is fine."""
        if self._loop.is_closed():
            return
        async def shut_down():
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self._http:
                await self._http.close()
        self._loop.run_until_complete(shut_down())
        self._loop.close()
        if self.cache is not None:
            self.cache.close()

    # ---- internals ------------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        """The client's HTTP session, for a caller outside the event loop."""
        async def inside():
            return self._session_now()
        return self._http or self._loop.run_until_complete(inside())

    def _session_now(self) -> aiohttp.ClientSession:
        """The client's HTTP session, opened on first use (inside the running loop)."""
        # aiohttp rather than httpx: measured here, httpx spent ~7 ms of CPU per request, aiohttp ~0.3 ms,
        # which decides whether 64 requests in flight reach the server's limit (bench/generation.py).
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.max_in_flight),
                                               cookie_jar=aiohttp.DummyCookieJar(),   # an API needs no cookies
                                               headers={"Authorization": f"Bearer {self.api_key}"},
                                               timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._http

    async def _next_replica(self) -> Replica:
        """The next replica in rotation; when every one is out, the first to come back, once it does."""
        while True:
            replica, wait = self.replicas.pick()
            if replica is not None:
                return replica
            await asyncio.sleep(wait)

    def _replica_failed(self, replica: Optional[Replica], failure: "_Retry") -> bool:
        """Count a failed attempt against its replica (with several); True when the replica was taken out of
        rotation and others remain, so that the request goes on at once elsewhere, the attempt not counted."""
        if replica is None or len(self.urls) == 1 or failure.rate_limited:
            return False
        taken_out = self.replicas.failed(replica, refused=failure.reason.startswith("connection error"))
        return taken_out and self.replicas.others_in_rotation(replica)

    async def _preflight(self, http) -> str:
        """Every replica's model list. With several, one that does not answer is left out of rotation with a
        warning (it is tried again later); none answering, or a single one not answering, is an error."""
        for replica in self.replicas.all:
            url = replica.url
            try:
                entries = await self._send_with_retries(http, "GET", url, "/models", None, self._parse_models,
                                                        retries=min(2, self.max_retries))
            except (_Failed, ServerUnreachable) as failure:
                reason = getattr(failure, "reason", None) or str(failure)
                if len(self.urls) > 1:
                    self.replicas.take_out(replica)
                    print(f"warning: replica {replica.name} does not answer ({reason}): it is left out of rotation "
                          "and tried again later", file=sys.stderr, flush=True)
                    continue
                if isinstance(failure, ServerUnreachable):
                    raise
                raise LLMFatalError(f"{replica.name} did not list its models ({reason}): "
                                    "is -u the base URL of an OpenAI-compatible server?") from None
            served = [entry["id"] for entry in entries]
            self._served.setdefault(url, {entry["id"]: entry for entry in entries})
            if self.model and served and self.model not in served:
                raise LLMFatalError(f"model '{self.model}' is not served at {public_host(url)}; it serves: "
                                    f"{', '.join(served)}: use one of these names")
            if not self.model:
                if len(served) != 1:
                    raise LLMFatalError(f"{public_host(url)} serves {len(served)} models "
                                        f"({', '.join(served) or 'none listed'}): choose one with -m")
                self.model = served[0]
        if not self._served:
            raise ServerUnreachable(f"none of the {len(self.urls)} replicas answered "
                                    f"({', '.join(r.name for r in self.replicas.all)}): start them or fix -u")
        return self.model

    @staticmethod
    def _parse_models(body: dict) -> list[dict]:
        entries = body["data"] or []        # Ollama lists no model as null
        if not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in entries):
            raise TypeError("a model entry without an id")
        return entries

    def identify_model(self, revision: str = "") -> dict:
        """After preflight(): what the servers say about the weights behind the model's name (their /models entry
        and llama.cpp's /props, DESCRIBES_THE_WEIGHTS only), one description per distinct answer of the replicas,
        with no host in it (the same model moved to another port is the same model), and the revision a user gave.
        Its hash becomes the fingerprint in every cache key: two models served under one name never share replies."""
        described = {"servers": self._loop.run_until_complete(self._describe(self._session())), "revision": revision}
        self.fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        self._unfingerprinted_keys = self.cache is not None and self.cache.adopts_unfingerprinted(self.fingerprint)
        return described

    async def _describe(self, http) -> list[dict]:
        description = []
        for url in self._served:
            listed = self._served[url].get(self.model, {})
            entry = {name: listed[name] for name in DESCRIBES_THE_WEIGHTS if name in listed}
            root = url[:-3] if url.endswith("/v1") else url
            try:
                props = await self._send_with_retries(http, "GET", root, "/props", None, dict, retries=0)
                entry["props_model_path"] = props.get("model_path")
            except (_Failed, LLMFatalError):
                pass                             # not a llama.cpp server
            if entry not in description:
                description.append(entry)
        return description

    @staticmethod
    def _parse_chat(body: dict) -> tuple[str, int, int, bool]:
        """(text, prompt tokens, completion tokens, truncated). The text is the message's content without a leading
        <think> block; a reasoning model's thinking (reasoning_content, reasoning) is never the answer. A reply cut at
        max_tokens (finish_reason "length") is truncated, even when the cut came inside the thinking and left no
        content: the caller asks again with a larger budget. An empty reply that was not cut is a failure worth
        retrying: a server under load sometimes returns one, and an empty answer would be scored as a wrong one."""
        choice = body["choices"][0]
        text = choice["message"].get("content")
        if not isinstance(text, (str, type(None))):
            raise TypeError("content is not text")
        text = _THINKING.sub("", text or "")
        truncated = choice.get("finish_reason") == "length"
        if not text.strip() and not truncated:
            raise _Retry("empty reply")
        usage = body.get("usage") or {}
        return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), truncated

    async def _complete_all(self, requests, desc) -> list[ChatResult]:
        """max_in_flight workers share one iterator over the requests, each taking the next one when free (fewer
        tasks and waiters than one task per request: measurably less client CPU at hundreds of requests/s)."""
        results: list[Optional[ChatResult]] = [None] * len(requests)
        todo = iter(enumerate(requests))
        with tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True) as bar:
            async def worker():
                for index, (messages, params) in todo:
                    results[index] = await self.complete(messages, params)
                    if bar.update(1):   # True when redrawn: only then is the token count worth formatting
                        bar.set_postfix(tokens=self.usage.prompt_tokens + self.usage.completion_tokens, refresh=False)
            await asyncio.gather(*(worker() for _ in range(min(self.max_in_flight, len(requests)))))
        return results

    async def _complete_one(self, http, key, messages, params) -> ChatResult:
        body = {"model": self.model, "messages": list(messages), **params}
        # The token estimate costs a JSON dump: only worth it when a rate limit is set.
        estimate = len(json.dumps(messages)) // 4 + int(params.get("max_tokens", 0)) if self._limiter.active else None
        try:
            text, prompt_tokens, completion_tokens, truncated = await self._send_with_retries(
                http, "POST", None, "/chat/completions", body, self._parse_chat, estimate=estimate)
        except _Failed as failure:
            self.usage.failed += 1
            return ChatResult(None, error=failure.reason)
        self.usage.sent += 1
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        if truncated:
            self.usage.truncated += 1
        if self.cache is not None:
            self.cache.put(key, text, prompt_tokens, completion_tokens, truncated)
        return ChatResult(text, prompt_tokens, completion_tokens, truncated=truncated)

    async def _send_with_retries(self, http, method, url, path, body, parse, retries=None,
                                 estimate: Optional[int] = None):
        """One request with retries. Raises LLMFatalError for what retrying cannot fix, and _Failed when this
        request alone fails: at once for a 4xx, once the retries are spent, or once its 429s have lasted
        rate_limit_wait seconds. With `estimate` (its tokens), every attempt first takes its place in the rpm/tpm
        windows: a provider counts retries too. Without `url`, each attempt goes to the next replica in rotation."""
        retries = self.max_retries if retries is None else retries
        attempt, rate_limited_for = 0, 0.0
        while True:
            replica = None if url else await self._next_replica()
            target = url or replica.url
            entry = await self._limiter.acquire(lambda: estimate) if estimate is not None else None
            try:
                parsed = await self._send_once(http, method, target, path, body, parse)
                if entry is not None:       # a chat reply: (text, prompt tokens, completion tokens, truncated)
                    RateLimiter.settle(entry, parsed[1] + parsed[2])
                if replica is not None:
                    self.replicas.succeeded(replica)
                return parsed
            except _Retry as failure:
                if self._replica_failed(replica, failure):
                    self.usage.retries += 1
                    continue                # its replica is out of rotation: on to another one at once
                backoff = min(self.backoff_max, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
                wait = failure.wait if failure.wait is not None else backoff
                if failure.rate_limited:
                    if rate_limited_for + wait > self.rate_limit_wait:
                        raise _Failed(f"HTTP 429 for {rate_limited_for:.0f} s, rate_limit_wait "
                                      f"{self.rate_limit_wait:g} s") from None
                    rate_limited_for += wait
                else:
                    if attempt == retries:
                        if failure.reason.startswith("connection error"):
                            raise ServerUnreachable(f"cannot reach {public_host(target)} ({failure.reason}) after "
                                                    f"{attempt + 1} tries: start the server or fix -u") from None
                        raise
                    attempt += 1
                self.usage.retries += 1
                await asyncio.sleep(wait)

    async def _send_once(self, http, method, url, path, body, parse):
        try:
            async with http.request(method, url + path, json=body) as response:
                status, headers = response.status, response.headers
                text = (await response.read()).decode("utf-8", errors="replace")
        except asyncio.TimeoutError:
            raise _Retry(f"timed out after {self.timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise _Retry(f"connection error: {type(e).__name__}") from None
        self._check_status(url, path, body, status, headers, text)
        try:
            return parse(json.loads(text))
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("malformed response body") from None

    def _check_status(self, url, path, body, status, headers, text):
        if status in (401, 403):
            raise LLMFatalError(f"{public_host(url)} rejected the API key (HTTP {status}): "
                                "pass a valid key with -k or the API_KEY environment variable")
        if status == 404 and body and "model" in text.lower():
            raise LLMFatalError(f"{public_host(url)} does not know model '{self.model}' (HTTP 404): "
                                "check -m against the server's /v1/models list")
        if status == 404:
            gateway = " (or, for a gateway that lists no models, pass --no_preflight and -m)" if path == "/models" else ""
            raise LLMFatalError(f"{public_host(url)}{urlsplit(url).path}{path} answered HTTP 404: "
                                f"-u must be the API base URL, usually ending in /v1{gateway}")
        if status == 429:
            raise _Retry("HTTP 429", retry_after_seconds(headers), rate_limited=True)
        if status == 408 or status >= 500:           # 408: the server timed out waiting: worth another try
            raise _Retry(f"HTTP {status}", retry_after_seconds(headers))
        if status >= 400:
            # 400 and friends: this request is wrong (e.g. longer than the context); retrying won't help.
            raise _Failed(f"HTTP {status}: {text[:200].strip()}")

    @staticmethod
    def _stream_piece(url: str, data: str) -> Optional[str]:
        """The answer text of one stream event: its delta's content. The thinking of a reasoning model
        (reasoning_content, reasoning) is not the answer; a usage-only event (no choices) carries none; an error
        event (vLLM, TGI: sent after the 200) ends the reply."""
        try:
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                message = error.get("message", "") if isinstance(error, dict) else error
                raise LLMFatalError(f"{public_host(url)} failed in the middle of the reply: {str(message)[:100]}")
            return event["choices"][0]["delta"].get("content") if event["choices"] else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise LLMFatalError(f"{public_host(url)} sent a malformed stream event: {data[:100]}") from None

    async def _stream(self, http, messages, params):
        url = (self.replicas.pick()[0] or self.replicas.all[0]).url
        body = {"model": self.model, "messages": list(messages), **params, "stream": True}
        try:
            async with http.post(url + "/chat/completions", json=body) as response:
                if response.status != 200:
                    text = (await response.read()).decode("utf-8", errors="replace")
                    self._check_status(url, "/chat/completions", body, response.status, response.headers, text)
                async for line in response.content:          # server-sent events: "data: {json}" lines
                    data = line.decode("utf-8", errors="replace").strip()
                    if not data.startswith("data:"):
                        continue
                    data = data[5:].strip()
                    if data == "[DONE]":
                        return
                    piece = self._stream_piece(url, data)
                    if piece:
                        yield piece
        except _Failed as failure:
            raise LLMFatalError(f"{public_host(url)} failed the request ({failure.reason})") from None
        except asyncio.TimeoutError:
            raise LLMFatalError(f"{public_host(url)} did not finish the reply within {self.timeout:g} s") from None
        except aiohttp.ClientError as e:
            raise LLMFatalError(f"cannot reach {public_host(url)} ({type(e).__name__}): is the server running?") from None
