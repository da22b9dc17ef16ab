"""An OpenAI-compatible server for benchmarks: every request is answered after a fixed delay, with no limit on
parallelism, so that the client is what gets measured. It is a bare asyncio protocol with a prebuilt reply:
a framework server (aiohttp.web was tried) spends enough CPU per request on this 2-core machine to show up
in the client's numbers.

  python bench/loopback_server.py PORT DELAY_SECONDS
"""
import asyncio
import json
import sys

MODELS = json.dumps({"object": "list", "data": [{"id": "teacher", "object": "model"}]}).encode()
CHAT = json.dumps({
    "id": "cmpl", "object": "chat.completion", "model": "teacher",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "1. What does the benchmark measure?\n2. How long is the delay?"}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}}).encode()


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
            self.buffer = rest[length:]
            if head.startswith(b"GET"):
                self.transport.write(http_response(MODELS))
            else:
                asyncio.get_running_loop().call_later(self.delay, self._reply)

    def _reply(self):
        if not self.transport.is_closing():
            self.transport.write(http_response(CHAT))


async def serve(port: int, delay: float):
    Loopback.delay = delay
    server = await asyncio.get_running_loop().create_server(Loopback, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])))
