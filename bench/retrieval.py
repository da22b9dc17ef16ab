"""Retrieval benchmark: this toolkit's retriever against the reference's way, on data/ with eval_llama.json.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/retrieval.py [--repeat 3]

Prints, measured in this one process on the same chunks and the same all-MiniLM-L6-v2 model:
  index build   LangChain FAISS.from_documents(HuggingFaceEmbeddings) versus retrieval.py cold (embeddings computed,
                in float32 and in its default dtype: bfloat16 where the hardware has it) and warm (embeddings read
                from its on-disk cache, as on every later run over the same chunks);
  query latency LangChain similarity_search one question at a time versus retrieval.py ranking all questions in
                one batch, per question;
  answer-support recall@1/3/5/7 of dense, BM25 and hybrid retrieval: the share of questions whose top-k chunks
                contain most of the gold answer's content words (no LLM involved).
Each timing is the best of --repeat runs; the model is loaded once per side before timing.
"""
import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=DeprecationWarning)

from langchain_core.documents import Document  # noqa: E402

import metrics  # noqa: E402
from raft_utils import content_words, load_documents, split_documents  # noqa: E402
from retrieval import (DEFAULT_EMBEDDING_MODEL, BM25Index, DenseIndex, Embedder, EmbeddingCache,  # noqa: E402
                       HybridIndex, embedding_model_path)

KS = (1, 3, 5, 7)


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def reference_side(chunks, questions, repeat):
    from langchain_community.embeddings import HuggingFaceEmbeddings
    from langchain_community.vectorstores import FAISS
    embeddings = HuggingFaceEmbeddings(model_name=embedding_model_path(DEFAULT_EMBEDDING_MODEL),
                                       model_kwargs={"device": "cpu"})
    documents = [Document(page_content=c.text, metadata={"source": c.source}) for c in chunks]
    store = {}
    build = best_of(repeat, lambda: store.update(index=FAISS.from_documents(documents, embeddings)))
    query = best_of(repeat, lambda: [store["index"].similarity_search(q, k=5) for q in questions])
    return build, query / len(questions)


def toolkit_side(chunks, questions, repeat):
    float32 = Embedder(DEFAULT_EMBEDDING_MODEL, dtype="float32")
    cold32 = best_of(repeat, lambda: DenseIndex(chunks, float32, EmbeddingCache(None)))
    embedder = Embedder(DEFAULT_EMBEDDING_MODEL)            # the default: dtype auto
    cold = best_of(repeat, lambda: DenseIndex(chunks, embedder, EmbeddingCache(None)))
    with tempfile.TemporaryDirectory() as cache_dir:
        DenseIndex(chunks, embedder, EmbeddingCache(cache_dir))              # fills the cache
        warm = best_of(repeat, lambda: DenseIndex(chunks, embedder, EmbeddingCache(cache_dir)))
        dense = DenseIndex(chunks, embedder, EmbeddingCache(cache_dir))
    query = best_of(repeat, lambda: dense.rank(questions, 5))
    bm25 = BM25Index(chunks)
    return cold32, (embedder.dtype, cold), warm, query / len(questions), {"dense": dense, "bm25": bm25, "hybrid": HybridIndex(dense, bm25)}


def recall_table(retrievers, chunks, eval_items) -> dict[str, list[float]]:
    rankings = {kind: r.rank([item["question"] for item in eval_items], max(KS)) for kind, r in retrievers.items()}
    answers = [item["answer"] for item in eval_items]
    return {kind: [metrics.support_recall(ranked, chunks, answers, k) for k in KS] for kind, ranked in rankings.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    chunks, _ = split_documents(load_documents(str(ROOT / "data"), "").documents, 1000)
    eval_items = json.loads((ROOT / "eval_llama.json").read_text())
    questions = [item["question"] for item in eval_items]
    print(f"{len(chunks)} chunks from data/, {len(questions)} questions from eval_llama.json, best of {args.repeat}")

    ref_build, ref_query = reference_side(chunks, questions, args.repeat)
    cold32, (dtype, cold), warm, query, retrievers = toolkit_side(chunks, questions, args.repeat)
    print(f"index build   LangChain FAISS.from_documents  {ref_build * 1000:8.1f} ms")
    print(f"              retrieval.py, float32, cold    {cold32 * 1000:8.1f} ms   {ref_build / cold32:5.2f}x")
    print(f"              retrieval.py, {dtype:8}, cold   {cold * 1000:8.1f} ms   {ref_build / cold:5.2f}x   (dtype auto)")
    print(f"              retrieval.py, cache warm       {warm * 1000:8.1f} ms   {ref_build / warm:5.1f}x")
    print(f"query         LangChain, one at a time       {ref_query * 1000:8.2f} ms/question")
    print(f"              retrieval.py, one batch        {query * 1000:8.2f} ms/question   {ref_query / query:5.1f}x")

    table = recall_table(retrievers, chunks, eval_items)
    judged = sum(bool(content_words(item["answer"])) for item in eval_items)
    print(f"answer-support recall ({judged} questions with content words in the answer)")
    print("              " + "  ".join(f"@{k:<5}" for k in KS))
    for kind, row in table.items():
        print(f"  {kind:10}  " + "  ".join(f"{value:.2f}  " for value in row))


if __name__ == "__main__":
    main()
