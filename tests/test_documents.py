"""Loading real files (md, txt, html, pdf), a sitemap over real HTTP, and the chunking rules."""
import functools
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from documents import html_to_text, load_documents, split_documents
from errors import InputError
from tests.conftest import FIXTURES, ROOT


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "docs"
    (folder / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(FIXTURES / "pdf" / "valid.pdf", folder / "valid.pdf")
    shutil.copy(FIXTURES / "pdf" / "corrupt.pdf", folder / "nested" / "corrupt.pdf")
    shutil.copy(FIXTURES / "bad_encoding.txt", folder / "bad_encoding.txt")
    shutil.copy(FIXTURES / "site" / "page1.html", folder / "nested" / "deeper" / "page1.htm")
    (folder / "notes.md").write_text("# Notes\n\nMarkdown text about Llama 3 tokenizers.")
    (folder / "plain.txt").write_text("Plain text about context length.")
    (folder / "empty.txt").write_text("   \n")
    (folder / "image.png").write_bytes(b"\x89PNG not a document")
    return folder


def test_folder_loads_every_supported_type_recursively_and_names_failures(mixed_folder):
    report = load_documents(str(mixed_folder), "")
    sources = sorted(d.metadata["source"].replace(str(mixed_folder) + "/", "") for d in report.documents)
    assert sources == ["nested/deeper/page1.htm", "notes.md", "plain.txt", "valid.pdf"]
    skipped = {s.replace(str(mixed_folder) + "/", ""): why for s, why in report.skipped}
    assert set(skipped) == {"nested/corrupt.pdf", "bad_encoding.txt", "empty.txt"}
    assert skipped["empty.txt"] == "no text" and skipped["nested/corrupt.pdf"].startswith("unreadable")
    pdf = next(d for d in report.documents if d.metadata["source"].endswith(".pdf"))
    assert "the answer is forty-two" in pdf.page_content and "grouped-query attention" in pdf.page_content


def test_html_loses_navigation_header_and_link_lists():
    text = html_to_text((FIXTURES / "site" / "page1.html").read_text())
    assert "Llama 3 was trained on over 15 trillion tokens." in text
    for boilerplate in ("NAVMENU", "HEADERBANNER", "LISTLINKS"):
        assert boilerplate not in text
    assert all(line.strip() for line in text.splitlines())        # blank lines dropped


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=f"data folder {tmp_path}/nope does not exist"):
        load_documents(str(tmp_path / "nope"), "")


@pytest.fixture
def site():
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(FIXTURES / "site"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_sitemap(path, urls):
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n'
                    + "".join(f"<url><loc>{u}</loc></url>\n" for u in urls) + "</urlset>\n")
    return str(path)


def test_sitemap_pages_are_fetched_and_failures_named(site, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/gone.html"
    sitemap = write_sitemap(tmp_path / "sitemap.xml", [f"{site}/page1.html", f"{site}/page2.html",
                                                       f"{site}/missing.html", dead])
    report = load_documents("", sitemap)
    assert [d.metadata["source"] for d in report.documents] == [f"{site}/page1.html", f"{site}/page2.html"]
    assert "15 trillion tokens" in report.documents[0].page_content
    assert "NAVMENU" not in report.documents[0].page_content
    assert dict(report.skipped) == {f"{site}/missing.html": "HTTP 404", dead: "unreachable: ConnectError"}


def test_folder_and_sitemap_together(site, tmp_path, mixed_folder):
    sitemap = write_sitemap(tmp_path / "sitemap.xml", [f"{site}/page2.html"])
    report = load_documents(str(mixed_folder), sitemap)
    assert report.documents[-1].metadata["source"] == f"{site}/page2.html" and len(report.documents) == 5


def test_sitemap_without_locations_is_an_error(tmp_path):
    (tmp_path / "s.xml").write_text("<urlset></urlset>")
    with pytest.raises(InputError, match="has no <loc> entries"):
        load_documents("", str(tmp_path / "s.xml"))


def test_chunking_on_the_demo_corpus():
    report = load_documents(str(ROOT / "data"), "")
    assert {d.metadata["source"].rsplit(".", 1)[1] for d in report.documents} == {"md", "txt", "html", "pdf"}
    assert not report.skipped
    chunks, dropped = split_documents(report.documents, 1000)
    assert len(chunks) >= 40
    assert all(100 < len(c.text) <= 1000 for c in chunks)
    assert len({c.text for c in chunks}) == len(chunks)
    smaller, _ = split_documents(report.documents, 500)
    assert len(smaller) > len(chunks) and all(len(c.text) <= 500 for c in smaller)


def test_duplicate_and_short_chunks_are_dropped():
    from langchain_core.documents import Document
    para = "A sentence about the Llama tokenizer and its vocabulary of many thousand entries. " * 3
    docs = [Document(page_content=para, metadata={"source": "a"}), Document(page_content=para, metadata={"source": "b"}),
            Document(page_content="Too short.", metadata={"source": "c"})]
    chunks, dropped = split_documents(docs, 1000)
    assert [c.source for c in chunks] == ["a"] and dropped == {"too short": 1, "duplicate": 1}


def test_sitemap_pages_are_fetched_concurrently_with_a_bound_and_retried(tmp_path):
    """20 pages that take 0.2 s each: fetched 8 at a time, never more; a 503 and a 429 with a malformed
    Retry-After are retried, a 404 is not."""
    import time
    from http.server import BaseHTTPRequestHandler
    from documents import SITEMAP_CONCURRENCY
    state = {"now": 0, "most": 0, "tries": {}}
    lock = threading.Lock()

    class Flaky(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
                tries = state["tries"][self.path] = state["tries"].get(self.path, 0) + 1
            time.sleep(0.2)
            with lock:
                state["now"] -= 1
            if self.path == "/p0.html" and tries == 1:
                return self._reply(503, b"busy")
            if self.path == "/p1.html" and tries == 1:
                return self._reply(429, b"slow down", {"Retry-After": "soon, maybe"})
            if self.path == "/gone.html":
                return self._reply(404, b"no")
            self._reply(200, f"<html><body><p>Page {self.path} says llamas graze at noon.</p></body></html>".encode())

        def _reply(self, status, body, headers=None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        urls = [f"{base}/p{i}.html" for i in range(20)] + [f"{base}/gone.html"]
        started = time.time()
        report = load_documents("", write_sitemap(tmp_path / "sitemap.xml", urls))
        elapsed = time.time() - started
    finally:
        server.shutdown()
        server.server_close()
    assert [d.metadata["source"] for d in report.documents] == urls[:20]          # sitemap order
    assert report.skipped == [(f"{base}/gone.html", "HTTP 404")] and state["tries"]["/gone.html"] == 1
    assert state["tries"]["/p0.html"] == 2 and state["tries"]["/p1.html"] == 2
    assert 4 <= state["most"] <= SITEMAP_CONCURRENCY
    assert elapsed < 2.5                 # one at a time: 23 requests x 0.2 s = 4.6 s at least
