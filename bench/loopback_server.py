"""An OpenAI-compatible server for benchmarks: every request is answered after a fixed delay, with no limit on
parallelism, so that the client is what gets measured. It is a bare asyncio protocol with replies built from a
template: a framework server (aiohttp.web was tried) spends enough CPU per request on this 2-core machine to
show up in the client's numbers.

  python bench/loopback_server.py PORT DELAY_SECONDS

It plays raft.py's teacher too: a question request (raft.yaml's question prompt) gets four questions that name
a checksum of the request, so that every chunk has questions of its own; an answer request (its prompt asks to
"Reason with quotes") gets a chain of thought that ends with <ANSWER>:. Anything else gets a fixed reply.
"""
import asyncio
import json
import sys
import zlib

MODELS = json.dumps({"object": "list", "data": [{"id": "teacher", "object": "model"}]}).encode()
CHAT = json.dumps({
    "id": "cmpl", "object": "chat.completion", "model": "teacher",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "1. What does the benchmark measure?\n2. How long is the delay?"}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}}).encode()


def chat(content: str) -> bytes:
    return json.dumps({"id": "cmpl", "object": "chat.completion", "model": "teacher",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                                    "content": content}}],
                       "usage": {"prompt_tokens": 400, "completion_tokens": 60, "total_tokens": 460}}).encode()


def reply_to(body: bytes) -> bytes:
    tag = zlib.crc32(body)
    if b"Reason with quotes" in body:
        return chat(f"The document says ##begin_quote## something ##end_quote##, so it is item {tag}.\n"
                    f"<ANSWER>: item {tag}")
    if b"questions that this document answers" in body:
        return chat("\n".join(f"{n}. What does the guide say about item {tag}-{n}?" for n in range(1, 5)))
    return CHAT


def http_response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Loopback(asyncio.Protocol):
    delay = 0.2

    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:          # keep-alive: several requests may arrive on one connection
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            if head.startswith(b"GET"):
                self.transport.write(http_response(MODELS))
            else:
                asyncio.get_running_loop().call_later(self.delay, self._reply, reply_to(body))

    def _reply(self, reply: bytes):
        if not self.transport.is_closing():
            self.transport.write(http_response(reply))


async def serve(port: int, delay: float):
    Loopback.delay = delay
    server = await asyncio.get_running_loop().create_server(Loopback, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])))
