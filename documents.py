"""Documents -> chunks: a folder (.txt, .md, .pdf, .html, .htm, one LangChain loader per extension) and/or a
sitemap's pages, split with the recipe's splitter.

raft.py, raft_eval.py, chat.py and the embedding tuner all start here, so the retriever sees the chunks the teacher
was asked about. The only module that imports LangChain; it does so inside the functions that load or split
(about half a second), so that importing Chunk costs nothing.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from errors import InputError

if TYPE_CHECKING:
    from langchain_core.documents import Document

# ============================================================================ load


def html_to_text(html: str) -> str:
    """Visible text of a page without its navigation: nav, header and link lists (div[role=list]) go,
    as do scripts and styles; blank lines are dropped."""
    from bs4 import BeautifulSoup      # imported here, as httpx below: only HTML and sitemaps need them
    soup = BeautifulSoup(html, "lxml")
    for element in soup.select("nav, header, div[role=list], script, style, noscript"):
        element.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _document(text: str, source: str) -> Document:
    from langchain_core.documents import Document
    return Document(page_content=text, metadata={"source": source})


def load_html(path: str) -> list[Document]:
    """A local HTML file, cleaned exactly like a page fetched from a sitemap."""
    return [_document(html_to_text(Path(path).read_text(encoding="utf-8")), path)]


def load_text(path: str) -> list[Document]:
    from langchain_community.document_loaders.text import TextLoader
    return TextLoader(path, encoding="utf-8").load()


def load_pdf(path: str) -> list[Document]:
    from langchain_community.document_loaders.pdf import PyPDFLoader
    # One document per file, pages joined by a blank line, so that chunks may span a page break.
    return PyPDFLoader(path, mode="single", pages_delimiter="\n\n").load()


LOADERS = {".txt": load_text, ".md": load_text, ".pdf": load_pdf, ".html": load_html, ".htm": load_html}


@dataclass
class LoadReport:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file or URL, why)


def load_folder(folder: str, report: LoadReport):
    """Every supported file under `folder`, recursively, in sorted order (so runs are reproducible)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"data folder {folder} does not exist: fix data_dir in the config or --data_dir")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LOADERS):
        try:
            docs = LOADERS[path.suffix.lower()](str(path))
        except Exception as e:   # a corrupt PDF or a bad encoding must not end the run: name it and go on
            report.skipped.append((str(path), f"unreadable: {type(e).__name__}: {str(e)[:120]}"))
            continue
        _keep_if_text(docs, str(path), report)


def sitemap_urls(xml_path: str) -> list[str]:
    from bs4 import BeautifulSoup
    try:
        soup = BeautifulSoup(Path(xml_path).read_bytes(), "xml")
    except OSError:
        raise InputError(f"sitemap {xml_path} cannot be read: fix xml_path in the config or --xml_path") from None
    urls = [loc.get_text(strip=True) for loc in soup.find_all("loc")]
    if not urls:
        raise InputError(f"sitemap {xml_path} has no <loc> entries: it must be a sitemap XML file")
    return urls


SITEMAP_CONCURRENCY = 8    # pages fetched at once: enough to hide a web server's latency, and polite to it
SITEMAP_RETRIES = 3        # more tries of a page on 408, 429, 5xx, a timeout or a dropped connection


def load_sitemap(xml_path: str, verify_ssl: bool, report: LoadReport, timeout: float = 30.0):
    """Every page of the sitemap, fetched concurrently (SITEMAP_CONCURRENCY at a time) and kept in sitemap order."""
    urls = sitemap_urls(xml_path)
    pages = asyncio.run(fetch_pages(urls, verify_ssl, timeout))
    for url, (text, why) in zip(urls, pages):
        if text is None:
            report.skipped.append((url, why))
        else:
            _keep_if_text([_document(html_to_text(text), url)], url, report)


async def fetch_pages(urls: list[str], verify_ssl: bool, timeout: float, concurrency: int = SITEMAP_CONCURRENCY,
                      retries: int = SITEMAP_RETRIES, backoff: float = 0.5) -> list[tuple[Optional[str], str]]:
    """(page text or None, why not) per URL. Retried like the teacher's requests: on 408, 429, 5xx, timeouts and
    connection errors, after the server's Retry-After when it sends a well-formed one, else after a doubling
    backoff; any other HTTP error at once."""
    import httpx
    from llm_client import retry_after_seconds
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(verify=verify_ssl, timeout=timeout, follow_redirects=True) as http:
        async def fetch(url: str) -> tuple[Optional[str], str]:
            if urlsplit(url).scheme not in ("http", "https"):
                return None, "not an http(s) URL"
            async with gate:
                for attempt in range(retries + 1):
                    wait = None
                    try:
                        response = await http.get(url)
                    except httpx.HTTPError as e:
                        why = f"unreachable: {type(e).__name__}"
                    else:
                        if response.status_code < 400:
                            return response.text, ""
                        why = f"HTTP {response.status_code}"
                        if response.status_code not in (408, 429) and response.status_code < 500:
                            return None, why
                        wait = retry_after_seconds(response.headers)
                    if attempt < retries:
                        await asyncio.sleep(wait if wait is not None else backoff * 2 ** attempt)
                return None, why
        return list(await asyncio.gather(*(fetch(url) for url in urls)))


def _keep_if_text(docs: list[Document], source: str, report: LoadReport):
    docs = [d for d in docs if d.page_content.strip()]
    if not docs:
        report.skipped.append((source, "no text"))
    for d in docs:
        d.metadata["source"] = source
    report.documents.extend(docs)


def load_documents(data_dir: str, xml_path: str, verify_ssl: bool = True) -> LoadReport:
    """Both sources when both are given. A file or page that fails is skipped and named in the report."""
    report = LoadReport()
    if not data_dir and not xml_path:
        raise InputError("no source given: set data_dir and/or xml_path in the config (or --data_dir / --xml_path)")
    if data_dir:
        load_folder(data_dir, report)
    if xml_path:
        load_sitemap(xml_path, verify_ssl, report)
    return report

# ============================================================================ chunk


MIN_CHUNK_CHARS = 100   # shorter chunks (menus, headings, page numbers) carry no answerable fact


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str


def split_documents(documents: list[Document], chunk_size: int) -> tuple[list[Chunk], dict]:
    """Split with the recipe's splitter; drop exact duplicates and chunks of MIN_CHUNK_CHARS or fewer.
    Returns the chunks in document order and how many were dropped, by reason."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_size // 10,
                                              separators=["----------", "\n\n", "\n", " "])
    chunks, seen, dropped = [], set(), {"too short": 0, "duplicate": 0}
    for piece in splitter.split_documents(documents):
        text = piece.page_content.strip()
        if len(text) <= MIN_CHUNK_CHARS:
            dropped["too short"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(text)
            chunks.append(Chunk(text, piece.metadata.get("source", "")))
    return chunks, dropped


def load_chunks(data_dir: str, xml_path: str, verify_ssl: bool, chunk_size: int
                ) -> tuple[LoadReport, list[Chunk], dict]:
    """Load both sources and chunk them: (load report, chunks, chunks dropped by reason). raft.py, raft_eval.py
    and chat.py all start here, so the retriever sees the chunks the teacher was asked about. An InputError names
    the sources, and every file skipped, when nothing usable is left."""
    loaded = load_documents(data_dir, xml_path, verify_ssl)
    sources = " and ".join(filter(None, [data_dir, xml_path]))
    if not loaded.documents:
        raise InputError(f"no documents could be read from {sources}: check data_dir and xml_path (or --data_dir)"
                         + "".join(f"\n  {source}: {why}" for source, why in loaded.skipped))
    chunks, dropped = split_documents(loaded.documents, chunk_size)
    if not chunks:
        raise InputError(f"the documents in {sources} gave no chunk longer than {MIN_CHUNK_CHARS} characters")
    return loaded, chunks, dropped

