"""A second retrieval stage: a reranker reads each of the first stage's top candidates with the question and the two
scores are mixed.

  reranker: none                      the fused ranking as it is (the default, until one is measured to be better)
  reranker: models/minilm-reranker    a sentence-transformers CrossEncoder: a hub name or a local folder
  reranker: llm                       the served model scores the candidates (pointwise: one request each, a grade
                                      from 0 to 10; listwise: one request per question, the candidates in order)

The reranker rereads the first `rerank_depth` candidates; each candidate's final score is rerank_weight times its
reranker score (scaled to 0..1 over the question's candidates) plus (1 - rerank_weight) times its first-stage
score (1 for the first, falling as reciprocal rank fusion does). Every LLM reply is cached like any other, so a
re-run rereads nothing. Used by raft_eval.py and chat.py through Reranked, a Ranker like the others.
"""
import re
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

from config import fill_prompt
from documents import Chunk
from errors import InputError
from llm_client import ChatClient
from retrieval import RRF_K, Ranker, embedding_model_path


class Scorer(Protocol):
    def scores(self, query: str, passages: Sequence[str]) -> list[float]: ...

    def scores_of(self, items: list[tuple[str, list[str]]]) -> list[list[float]]: ...


class CrossEncoderScorer:
    """A sentence-transformers CrossEncoder: one relevance score per (question, passage) pair, in batches."""

    def __init__(self, name: str, batch_size: int = 16):
        from sentence_transformers import CrossEncoder         # slow import: only when a reranker is used
        try:
            self.model = CrossEncoder(embedding_model_path(name), device="cpu")
        except (OSError, ValueError, InputError) as e:
            raise InputError(f"reranker '{name}' could not be loaded ({str(e).splitlines()[0][:120]}): set reranker "
                             "to a CrossEncoder folder, a hub name the machine can reach, llm or none") from None
        self.batch_size = batch_size

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        return [float(s) for s in self.model.predict([(query, p) for p in passages], batch_size=self.batch_size,
                                                     show_progress_bar=False)]

    def scores_of(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        return [self.scores(query, passages) for query, passages in items]


_NUMBER = re.compile(r"\b(10|[0-9])(?:\.\d+)?\b")


class LLMScorer:
    """The served model grades candidates: pointwise, each passage from 0 to 10 in a request of its own; listwise, all
    of a question's passages in one request, answered with their numbers in order. A grade that cannot be read
    counts as 0 (pointwise) or leaves the passage after the ranked ones (listwise), and is counted."""

    def __init__(self, client: ChatClient, mode: str, prompt: list[dict], params: dict):
        self.client, self.mode, self.prompt, self.params = client, mode, prompt, params
        self.unreadable = 0

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        return self.scores_of([(query, list(passages))])[0]

    def scores_of(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """The scores of many questions' candidates in one pass through the client (full concurrency)."""
        if self.mode == "pointwise":
            requests = [(fill_prompt(self.prompt, question=q, passage=p), self.params) for q, ps in items for p in ps]
            replies = iter(self.client.complete_all(requests, "rerank"))
            return [[self._grade(next(replies).text) for _ in ps] for _, ps in items]
        requests = [(fill_prompt(self.prompt, question=q, passages="\n".join(f"[{n}] {p}" for n, p in
                                                                              enumerate(ps, 1))), self.params)
                    for q, ps in items]
        return [self._order(result.text, len(ps)) for (_, ps), result in
                zip(items, self.client.complete_all(requests, "rerank"))]

    def _grade(self, reply: Optional[str]) -> float:
        match = _NUMBER.search(reply or "")
        if match is None:
            self.unreadable += 1
            return 0.0
        return float(match.group(1))

    def _order(self, reply: Optional[str], count: int) -> list[float]:
        named = [int(n) for n in re.findall(r"\d+", reply or "") if 1 <= int(n) <= count]
        order = list(dict.fromkeys(named))                      # the first mention of each passage counts
        if len(order) < count:
            self.unreadable += 1
        order += [n for n in range(1, count + 1) if n not in order]
        return [float(count - order.index(n)) for n in range(1, count + 1)]


def mixed_order(first: Sequence[int], scores: Sequence[float], weight: float) -> list[int]:
    """The candidates `first` (best first) reordered by weight x their reranker score (scaled to 0..1) + (1 - weight)
    x their first-stage score (1/(RRF_K + rank), scaled so that the first is 1); ties keep the first order."""
    scores = np.asarray(scores, dtype=float)
    spread = scores.max() - scores.min() if len(scores) else 0.0
    reread = (scores - scores.min()) / spread if spread > 0 else np.zeros(len(scores))
    prior = np.array([(RRF_K + 1) / (RRF_K + r) for r in range(1, len(first) + 1)])
    mixed = weight * reread + (1 - weight) * prior
    return [first[i] for i in sorted(range(len(first)), key=lambda i: (-mixed[i], i))]


@dataclass
class Reranked:
    """A Ranker whose first `depth` candidates are reread by `scorer` and reordered (mixed_order)."""
    inner: Ranker
    scorer: Scorer
    chunks: Sequence[Chunk]
    depth: int
    weight: float

    def rank(self, queries: Sequence[str], depth: int) -> list[list[int]]:
        firsts = self.inner.rank(queries, max(depth, self.depth))
        heads = [(q, [self.chunks[i].text for i in first[:self.depth]]) for q, first in zip(queries, firsts)]
        scores = self.scorer.scores_of(heads)
        return [(mixed_order(first[:self.depth], s, self.weight) + list(first[self.depth:]))[:depth]
                for first, s in zip(firsts, scores)]


def with_reranker(ranker: Ranker, chunks: Sequence[Chunk], cfg: dict, client: Optional[ChatClient]) -> Ranker:
    """The ranker itself (reranker: none), or the ranker with its top rerank_depth reread: by a CrossEncoder, or by
    the model behind `client` (reranker: llm)."""
    name = cfg["reranker"]
    if name == "none":
        return ranker
    if name == "llm":
        if client is None:
            raise InputError("reranker llm needs a model server: give its URL with --rerank_url")
        prompt = cfg["rerank_prompt"] if cfg["rerank_mode"] == "pointwise" else cfg["rerank_list_prompt"]
        scorer = LLMScorer(client, cfg["rerank_mode"], prompt,
                           {"temperature": 0.0, "max_tokens": cfg["rerank_max_tokens"]})
    else:
        scorer = CrossEncoderScorer(name, cfg["embedding_batch_size"])
    return Reranked(ranker, scorer, chunks, cfg["rerank_depth"], cfg["rerank_weight"])
