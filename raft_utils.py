"""Documents -> chunks -> parsed teacher output -> RAFT records.

Shared by raft.py (generation), raft_eval.py and chat.py (the retriever must see the same chunks).
Data flows one way through the four sections below: load, chunk, parse, assemble.
"""
import asyncio
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document
from langchain_community.document_loaders.text import TextLoader
from langchain_text_splitters import RecursiveCharacterTextSplitter


class InputError(Exception):
    """The documents cannot be used as given: the message names the file, folder or URL and what to do."""

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


class CleanHTMLLoader(BaseLoader):
    """A local HTML file, cleaned exactly like a page fetched from a sitemap."""

    def __init__(self, file_path: str):
        self.file_path = file_path

    def lazy_load(self) -> Iterator[Document]:
        text = html_to_text(Path(self.file_path).read_text(encoding="utf-8"))
        yield Document(page_content=text, metadata={"source": str(self.file_path)})


def _utf8_text_loader(path: str) -> BaseLoader:
    return TextLoader(path, encoding="utf-8")


def _single_document_pdf_loader(path: str) -> BaseLoader:
    # Imported here: the PDF loader's imports take 0.7 s, paid only by a corpus with PDFs in it.
    from langchain_community.document_loaders.pdf import PyPDFLoader
    # One document per file, pages joined by a blank line, so that chunks may span a page break.
    return PyPDFLoader(path, mode="single", pages_delimiter="\n\n")


LOADERS = {".txt": _utf8_text_loader, ".md": _utf8_text_loader, ".pdf": _single_document_pdf_loader,
           ".html": CleanHTMLLoader, ".htm": CleanHTMLLoader}


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
            docs = LOADERS[path.suffix.lower()](str(path)).load()
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
            _keep_if_text([Document(page_content=html_to_text(text), metadata={"source": url})], url, report)


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

# ============================================================================ parse


_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.)\]:]|q\d{1,3}[.):]|question\s*\d{0,3}\s*[.):])\s*", re.I)
_QUOTES = "\"'“”‘’`"


def normalise(text: str) -> str:
    """Lower case, single spaces: the form used to compare questions and quotes."""
    return " ".join(text.lower().split())


# Words that carry no content: left out of keyword search (BM25) and of the answer-support check.
STOPWORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its may might more most no not of on or our so such than that the their them then there these they this
those to was we were what when where which who whom whose why will with would yes you your""".split())


def content_words(text: str) -> list[str]:
    """Lower-case words and numbers (version numbers such as 3.1 kept whole) that are not stopwords."""
    return [w for w in re.findall(r"[a-z0-9]+(?:[.'][a-z0-9]+)*", text.lower()) if w not in STOPWORDS]


_ASKING = re.compile(r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|can|could|does|do|did|"
                     r"should|will|would|may|explain|describe|list|name|give|compare)\b", re.I)
_SELF_REFERENCE = re.compile(r"\bthis (document|passage|text|context|chunk|excerpt)\b|"
                             r"\b(according to|in|from|based on) the (document|passage|text|context|excerpt)\b", re.I)


def parse_questions(reply: str) -> list[str]:
    """Questions from a teacher reply, loosely: numbering, bullets, bold and quotes stripped; several questions
    on one line split apart; lines that neither end in '?' nor start like a question or a request dropped
    (headers such as 'Here are 4 questions:', summaries of the chunk); questions that point at 'the document'
    dropped, since the user who asks them later has no document in front of them."""
    questions = []
    for line in reply.splitlines():
        for piece in re.split(r"(?<=\?)\s+", line.strip()):
            piece = _LIST_MARKER.sub("", piece.replace("**", "")).strip().strip(_QUOTES).strip()
            if len(piece) >= 8 and (piece.endswith("?") or _ASKING.match(piece)) and not piece.endswith(":") \
                    and not _SELF_REFERENCE.search(piece):
                questions.append(piece)
    return questions


_ANSWER_MARK = re.compile(r"<ANSWER>\s*:(.*)", re.S)


def final_answer(cot_answer: str) -> Optional[str]:
    """The text after '<ANSWER>:', or None when the marker or the text after it is missing."""
    match = _ANSWER_MARK.search(cot_answer or "")
    return match.group(1).strip() if match and match.group(1).strip() else None


_QUOTE_SPAN = re.compile(r"##begin_quote##(.*?)##end_quote##", re.S)


def quotes_verified(cot_answer: str, oracle: str) -> bool:
    """True when the answer quotes the oracle at least once and every quote is found in it
    (whitespace- and case-insensitive). An unclosed ##begin_quote## counts as unverified."""
    spans = _QUOTE_SPAN.findall(cot_answer)
    if not spans or cot_answer.count("##begin_quote##") != len(spans):
        return False
    haystack = normalise(oracle)
    return all(normalise(s).strip(_QUOTES + " .…") in haystack for s in spans)

# ============================================================================ assemble


@dataclass(frozen=True)
class QA:
    chunk_index: int
    question: str
    cot_answer: str
    quotes_verified: bool


@dataclass(frozen=True)
class AssemblySettings:
    num_distract_docs: int
    oracle_probability: float
    refusal_probability: float
    refusal_answer: str


def chunks_needed(s: AssemblySettings) -> int:
    """The oracle, its distractors, and one more when an oracle may be replaced or a refusal example
    (distractors only) may be drawn."""
    spare = 1 if s.oracle_probability < 1 or s.refusal_probability > 0 else 0
    return 1 + s.num_distract_docs + spare


def instruction(docs: list[str], question: str) -> str:
    """The documents and the question in the RAFT record's form: what the student sees in training, in the
    evaluation's RAG answers and in chat."""
    return "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + question


def _record(row: int, prefix: str, question: str, docs: list[str], oracle: Chunk, answer: str,
            oracle_present: bool, verified: Optional[bool]) -> dict:
    return {
        "id": f"{prefix}_{row}",
        "type": "general",
        "question": question,
        "context": {"title": [["placeholder_title"] * len(docs)], "sentences": [docs]},
        "oracle_context": oracle.text,
        "cot_answer": answer,
        "instruction": instruction(docs, question),
        "source": oracle.source,
        "oracle_present": oracle_present,
        "quotes_verified": verified,
    }


class Assembler:
    """RAFT records, in the order of the QAs it is given, window after window: one seeded generator and one row
    counter for the whole run, so any split into windows gives the same records as a single window. Each
    question costs O(num_distract_docs) draws, whatever the number of chunks."""

    def __init__(self, chunks: list[Chunk], settings: AssemblySettings, seed: int):
        self.chunks, self.s = chunks, settings
        self.rng = random.Random(seed)
        self.rows = 0

    def _others(self, oracle: int, count: int) -> list[int]:
        """`count` distinct chunk indices other than the oracle's (drawn among n - 1, the oracle skipped over)."""
        drawn = self.rng.sample(range(len(self.chunks) - 1), count)
        return [i + 1 if i >= oracle else i for i in drawn]

    def _record(self, prefix: str, *fields) -> dict:
        record = _record(self.rows, prefix, *fields)
        self.rows += 1
        return record

    def records(self, qas: list[QA]) -> list[dict]:
        s, chunks, rng = self.s, self.chunks, self.rng
        out = []
        for qa in qas:
            oracle = chunks[qa.chunk_index]
            available = len(chunks) - 1
            # One extra distinct distractor stands by to take the oracle's place.
            drawn = self._others(qa.chunk_index, s.num_distract_docs + (1 if available > s.num_distract_docs else 0))
            docs = [oracle.text] + [chunks[i].text for i in drawn[:s.num_distract_docs]]
            rng.shuffle(docs)
            oracle_present = rng.random() < s.oracle_probability
            if not oracle_present:
                docs[docs.index(oracle.text)] = chunks[drawn[-1]].text
            out.append(self._record("seed_task", qa.question, docs, oracle, qa.cot_answer, oracle_present,
                                    qa.quotes_verified))
            if rng.random() < s.refusal_probability:
                refusal_docs = [chunks[i].text for i in self._others(qa.chunk_index, s.num_distract_docs + 1)]
                out.append(self._record("refusal_task", qa.question, refusal_docs, oracle, s.refusal_answer,
                                        False, None))
        return out


def assemble(qas: list[QA], chunks: list[Chunk], s: AssemblySettings, seed: int) -> list[dict]:
    """RAFT records of a list of QAs in one go (see Assembler)."""
    return Assembler(chunks, s, seed).records(qas)
