"""Retrieval benchmark: which retriever finds the answer on questions written the way users ask them, and at what
cost. Prints numbers; asserts nothing.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/retrieval.py [--repeat 3] [--tuned_model DIR ...] [--reranker DIR]
      [--large 200000]

1. The dev set, eval/dev_questions.json: hand-written paraphrases, questions that need two chunks, abbreviations
   and typos, over data/ (its unanswerable questions are left out here). A question is found at k when its top-k
   chunks hold every passage it needs (each `support` quote). Recall@1/3/5/7 of dense, BM25 and the plain RRF
   hybrid with today's settings, then of the tuned hybrid: its levers (fusion weight, BM25 k1/b, stemming, the file
   name in each chunk, the LLM-free query rewrite) are chosen by 5-fold cross-validation, each fold scored with
   the settings chosen on the other four, never on its own questions. With --tuned_model (repeatable), dense and
   the cross-validated hybrid again with each embedding model fine-tuned by finetune/embeddings.py (on the
   documents, or on RAFT data written without the dev questions).
2. Cost: index build and query time of today's hybrid and of the tuned default, best of --repeat, and LangChain's
   FAISS.from_documents + similarity_search as the reference. With --reranker (a CrossEncoder folder or hub name),
   the time a query adds when it rereads the tuned hybrid's top rerank_depth (raft_eval_config.yaml's) with it;
   bench/rerank.py says whether it finds more.
3. eval_llama.json's answer-support recall (questions that copy the documents' words), for continuity.
4. --large N: the approximate (HNSW) index against the exact one on N synthetic unit vectors of the embedding's
   size: recall@10 of the approximate index, and the query time of both.
"""
import argparse
import itertools
import json
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import metrics  # noqa: E402
from documents import load_documents, split_documents  # noqa: E402
from text import content_words  # noqa: E402
from retrieval import (DEFAULT_EMBEDDING_MODEL, BM25Index, DenseIndex, Embedder, EmbeddingCache,  # noqa: E402
                       QueryRewriter, SearchSettings, build_retriever, embedding_model_path,
                       reciprocal_rank_fusion, vector_index, HNSW_NEIGHBOURS, HNSW_SEARCH)

KS = (1, 3, 5, 7)
FOLDS = 5
TODAY = SearchSettings(dense_weight=0.5, bm25_k1=1.5, bm25_b=0.75, stemming=False, source_titles=False,
                       query_rewrite=False)     # the retriever before this benchmark's levers
GRID = {"dense_weight": (0.3, 0.4, 0.5, 0.6, 0.7), "stemming": (False, True), "source_titles": (False, True),
        "query_rewrite": (False, True), "bm25": ((1.5, 0.75), (1.2, 0.75), (0.9, 0.4))}


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


# ---- the dev set -----------------------------------------------------------------------------------------------
def needed_chunks(items, chunks) -> list[list[set[int]]]:
    """Per question, per support quote, the chunks that hold it (chunks overlap: a quote may be in two)."""
    texts = [" ".join(c.text.lower().split()) for c in chunks]
    needed = []
    for item in items:
        quotes = [" ".join(q.lower().split()) for q in item["support"]]
        needed.append([{i for i, t in enumerate(texts) if q in t} for q in quotes])
    return needed


def found(ranking, need, k) -> bool:
    top = set(ranking[:k])
    return all(holders & top for holders in need)


def recalls(rankings, needs, ks=KS) -> list[float]:
    return [sum(found(r, n, k) for r, n in zip(rankings, needs)) / len(needs) for k in ks]


class Levers:
    """Every ranking the grid needs, each computed once: dense per (titles, rewrite), BM25 per (stemming, titles,
    k1/b, rewrite); a setting's hybrid ranking is then only a fusion."""

    def __init__(self, chunks, questions, embedder, cache_dir):
        self.chunks, self.questions, self.embedder, self.cache_dir = chunks, questions, embedder, cache_dir
        self.rewriter = QueryRewriter([c.text for c in chunks])
        self.rewritten = [self.rewriter.rewrite(q) for q in questions]
        self.memo = {}

    def queries(self, rewrite):
        return self.rewritten if rewrite else self.questions

    def dense(self, titles, rewrite):
        key = ("dense", titles, rewrite)
        if key not in self.memo:
            index = DenseIndex(self.chunks, self.embedder, EmbeddingCache(self.cache_dir),
                               replace(TODAY, source_titles=titles))
            self.memo[key] = index.rank(self.queries(rewrite), 50)
        return self.memo[key]

    def bm25(self, stemming, titles, k1b, rewrite):
        key = ("bm25", stemming, titles, k1b, rewrite)
        if key not in self.memo:
            settings = replace(TODAY, stemming=stemming, source_titles=titles, bm25_k1=k1b[0], bm25_b=k1b[1])
            self.memo[key] = BM25Index(self.chunks, settings).rank(self.queries(rewrite), 50)
        return self.memo[key]

    def hybrid(self, s: SearchSettings):
        dense = self.dense(s.source_titles, s.query_rewrite)
        bm25 = self.bm25(s.stemming, s.source_titles, (s.bm25_k1, s.bm25_b), s.query_rewrite)
        weights = (s.dense_weight, 1 - s.dense_weight)
        return [reciprocal_rank_fusion(pair, weights=weights)[:max(KS)] for pair in zip(dense, bm25)]


def grid():
    for weight, stemming, titles, rewrite, (k1, b) in itertools.product(*GRID.values()):
        yield SearchSettings(dense_weight=weight, bm25_k1=k1, bm25_b=b, stemming=stemming, source_titles=titles,
                             query_rewrite=rewrite)


def cross_validate(levers: Levers, needs, seed=0):
    """Held-out recall of the setting chosen on the other folds (by mean recall over KS), and the choices."""
    order = list(range(len(needs)))
    random.Random(seed).shuffle(order)
    folds = [order[f::FOLDS] for f in range(FOLDS)]
    rankings = {s: levers.hybrid(s) for s in grid()}
    held_out_found = {k: 0 for k in KS}
    chosen = []
    for fold in folds:
        train = [i for i in order if i not in set(fold)]
        best = max(rankings, key=lambda s: (np.mean(recalls([rankings[s][i] for i in train], [needs[i] for i in train])),
                                            s == TODAY))
        chosen.append(best)
        for k in KS:
            held_out_found[k] += sum(found(rankings[best][i], needs[i], k) for i in fold)
    on_all = max(rankings, key=lambda s: (np.mean(recalls(rankings[s], needs)), s == TODAY))
    return [held_out_found[k] / len(needs) for k in KS], chosen, on_all


def describe(s: SearchSettings) -> str:
    return (f"weight {s.dense_weight}, k1 {s.bm25_k1} b {s.bm25_b}, stemming {'on' if s.stemming else 'off'}, "
            f"file names {'on' if s.source_titles else 'off'}, rewrite {'on' if s.query_rewrite else 'off'}")


def dev_set(chunks, embedder, tuned_models, cache_dir):
    items = [i for i in json.loads((ROOT / "eval" / "dev_questions.json").read_text()) if i["kind"] != "unanswerable"]
    needs = needed_chunks(items, chunks)
    questions = [i["question"] for i in items]
    levers = Levers(chunks, questions, embedder, cache_dir)
    rows = {"dense": recalls(levers.dense(False, False), needs),
            "BM25": recalls(levers.bm25(False, False, (1.5, 0.75), False), needs),
            "hybrid, plain RRF (today's default)": recalls(levers.hybrid(TODAY), needs)}
    held_out, chosen, on_all = cross_validate(levers, needs)
    rows["hybrid, tuned (held-out folds)"] = held_out
    chosen_for = {}
    for model in tuned_models:
        tuned = Levers(chunks, questions, Embedder(model), cache_dir)
        name = Path(model).name
        rows[f"dense, {name}"] = recalls(tuned.dense(False, False), needs)
        tuned_held_out, tuned_chosen, _ = cross_validate(tuned, needs)
        rows[f"hybrid tuned, {name} (held-out folds)"] = tuned_held_out
        chosen_for[name] = tuned_chosen
    kinds = {kind: sum(i["kind"] == kind for i in items) for kind in ("paraphrase", "multi", "abbreviation", "typo")}
    print(f"\n== Dev set: {len(items)} answerable questions of eval/dev_questions.json "
          f"({', '.join(f'{n} {k}' for k, n in kinds.items())}); found = every needed passage in the top k")
    print(f"{'retriever':56}" + "".join(f"{'@' + str(k):>7}" for k in KS))
    for name, row in rows.items():
        print(f"{name:56}" + "".join(f"{v:7.2f}" for v in row))
    print("settings chosen per fold: " + " | ".join(describe(s) for s in chosen))
    for name, per_fold in chosen_for.items():
        print(f"with {name}, per fold: " + " | ".join(describe(s) for s in per_fold))
    print(f"chosen on all the questions (the shipped default): {describe(on_all)}")
    by_kind = {}
    for kind in kinds:
        picked = [n for n, i in zip(needs, items) if i["kind"] == kind]
        ranks = [r for r, i in zip(levers.hybrid(on_all), items) if i["kind"] == kind]
        by_kind[kind] = recalls(ranks, picked)[2]
    print("recall@5 of the default by kind (all questions, not held out): "
          + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
    return on_all


# ---- cost --------------------------------------------------------------------------------------------------------
def cost(chunks, questions, repeat, chosen, reranker):
    from langchain_community.embeddings import HuggingFaceEmbeddings
    from langchain_community.vectorstores import FAISS
    from langchain_core.documents import Document
    embeddings = HuggingFaceEmbeddings(model_name=embedding_model_path(DEFAULT_EMBEDDING_MODEL),
                                       model_kwargs={"device": "cpu"})
    documents = [Document(page_content=c.text, metadata={"source": c.source}) for c in chunks]
    store = {}
    ref_build = best_of(repeat, lambda: store.update(index=FAISS.from_documents(documents, embeddings)))
    ref_query = best_of(repeat, lambda: [store["index"].similarity_search(q, k=5) for q in questions])
    embedder = Embedder(DEFAULT_EMBEDDING_MODEL)
    rows = []
    for name, settings in (("hybrid, today's settings", TODAY), ("hybrid, the tuned default", chosen)):
        cold = best_of(repeat, lambda: build_retriever(chunks, "hybrid", cache_dir=None, settings=settings))
        with tempfile.TemporaryDirectory() as cache_dir:
            build_retriever(chunks, "hybrid", cache_dir=cache_dir, settings=settings)
            warm = best_of(repeat, lambda: build_retriever(chunks, "hybrid", cache_dir=cache_dir, settings=settings))
            retriever = build_retriever(chunks, "hybrid", cache_dir=cache_dir, settings=settings)
            query = best_of(repeat, lambda: retriever.rank(questions, 5)) / len(questions)
        rows.append((name, cold, warm, query))
    print(f"\n== Cost: {len(chunks)} chunks, {len(questions)} questions, best of {repeat}; embeddings in "
          f"{embedder.dtype} ({embedder.dtype_reason})")
    print(f"{'':40}{'build cold':>11}{'build warm':>11}{'query':>13}")
    print(f"{'LangChain FAISS (reference)':40}{ref_build * 1000:9.0f} ms{'':>11}{ref_query / len(questions) * 1000:9.2f} ms/q")
    for name, cold, warm, query in rows:
        print(f"{name:40}{cold * 1000:9.0f} ms{warm * 1000:9.0f} ms{query * 1000:9.2f} ms/q")
    (_, cold0, warm0, query0), (_, cold1, warm1, query1) = rows
    print(f"tuned / today: build cold {cold1 / cold0:.2f}x, warm {warm1 / warm0:.2f}x, query {query1 / query0:.2f}x")
    if reranker:
        reranking_cost(chunks, questions, repeat, chosen, reranker, query1)
    return embedder


def reranking_cost(chunks, questions, repeat, chosen, reranker, first_stage):
    from config import EVAL_SCHEMA, load_config
    from rerank import CrossEncoderScorer, Reranked
    depth = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rerank_depth"]
    reranked = Reranked(build_retriever(chunks, "hybrid", settings=chosen), CrossEncoderScorer(reranker), chunks,
                        depth, 0.5)
    query = best_of(repeat, lambda: reranked.rank(questions, 5)) / len(questions)
    print(f"{'+ reranking the top ' + str(depth) + ' (' + Path(reranker).name + ')':40}{'':>22}{query * 1000:9.2f} ms/q"
          f"   ({query / first_stage:.0f}x the hybrid alone)")


def eval_llama(chunks, chosen):
    items = json.loads((ROOT / "eval_llama.json").read_text())
    questions, answers = [i["question"] for i in items], [i["answer"] for i in items]
    judged = sum(bool(content_words(a)) for a in answers)
    print(f"\n== eval_llama.json: answer-support recall ({judged} questions whose answer has content words)")
    print(f"{'retriever':46}" + "".join(f"{'@' + str(k):>7}" for k in KS))
    for name, kind, settings in (("dense", "dense", TODAY), ("BM25", "bm25", TODAY),
                                 ("hybrid, today's settings", "hybrid", TODAY),
                                 ("hybrid, the tuned default", "hybrid", chosen)):
        ranked = build_retriever(chunks, kind, settings=settings).rank(questions, max(KS))
        print(f"{name:46}" + "".join(f"{metrics.support_recall(ranked, chunks, answers, k):7.2f}" for k in KS))


# ---- large corpora -----------------------------------------------------------------------------------------------
def large(n: int, dim: int = 384, latent: int = 24, queries: int = 1000, seed: int = 0):
    """Synthetic unit vectors shaped like sentence embeddings: a few dimensions of meaning (a mixture of topics in
    `latent` dimensions) spread over `dim`, plus a little noise; queries near random ones."""
    rng = np.random.default_rng(seed)
    spread = rng.normal(size=(latent, dim)).astype(np.float32)
    topics = rng.normal(size=(max(1, n // 200), latent)).astype(np.float32)
    meaning = topics[rng.integers(0, len(topics), n)] + 0.5 * rng.normal(size=(n, latent)).astype(np.float32)
    vectors = meaning @ spread + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picked = meaning[rng.integers(0, n, queries)] + 0.2 * rng.normal(size=(queries, latent)).astype(np.float32)
    asked = picked @ spread + 0.3 * rng.normal(size=(queries, dim)).astype(np.float32)
    asked /= np.linalg.norm(asked, axis=1, keepdims=True)
    started = time.perf_counter()
    exact = vector_index(vectors, approximate_above=n)
    exact_build = time.perf_counter() - started
    started = time.perf_counter()
    approximate = vector_index(vectors, approximate_above=0)
    approximate_build = time.perf_counter() - started
    timings, results = {}, {}
    for name, index in (("exact", exact), ("HNSW", approximate)):
        started = time.perf_counter()
        results[name] = index.search(asked, 10)[1]
        timings[name] = (time.perf_counter() - started) / queries
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(results["HNSW"], results["exact"])])
    print(f"\n== Large corpus: {n:,} synthetic {dim}-dimensional unit vectors ({latent} dimensions of meaning), "
          f"{queries} queries")
    print(f"exact (IndexFlatIP)          build {exact_build:6.1f} s   query {timings['exact'] * 1000:7.2f} ms")
    print(f"HNSW (M {HNSW_NEIGHBOURS}, efSearch {HNSW_SEARCH})   build {approximate_build:6.1f} s   query "
          f"{timings['HNSW'] * 1000:7.2f} ms   recall@10 against exact {recall:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tuned_model", action="append", default=[],
                   help="an embedding model tuned by finetune/embeddings.py, measured beside (repeatable)")
    p.add_argument("--reranker", help="a CrossEncoder folder or hub name whose cost per query is measured")
    p.add_argument("--large", type=int, default=200_000, help="synthetic vectors for the HNSW check (0: skip)")
    args = p.parse_args()
    chunks, _ = split_documents(load_documents(str(ROOT / "data"), "").documents, 1000)
    with tempfile.TemporaryDirectory() as cache_dir:
        chosen = dev_set(chunks, Embedder(DEFAULT_EMBEDDING_MODEL), args.tuned_model, cache_dir)
    print(f"as config: {json.dumps({k: v for k, v in asdict(chosen).items() if k != 'approximate_above'})}")
    questions = [i["question"] for i in json.loads((ROOT / "eval" / "dev_questions.json").read_text())]
    cost(chunks, questions, args.repeat, chosen, args.reranker)
    eval_llama(chunks, chosen)
    if args.large:
        large(args.large)


if __name__ == "__main__":
    main()
