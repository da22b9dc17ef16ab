"""Train a cross-encoder reranker on your own documents (no LLM needed): it learns to read a question with a passage
and say how well the passage answers it. On a CPU this takes minutes.

  python finetune/reranker.py --documents data/ --output models/minilm-reranker       # make reranker
  # then, in raft_eval_config.yaml (or chat.py --reranker):  reranker: models/minilm-reranker

Pairs are cut from the chunks as finetune/embeddings.py --documents cuts them (the inverse cloze task: each
sentence of a chunk is a query, the chunk without that sentence its passage), and RAFT questions with their oracle
chunks join them with --data_path. Each query gets its passage (label 1) and --negatives hard negatives (label 0):
the chunks that BM25 and the dense index rank highest for it among the other chunks, which is what the reranker
must learn to put below the right one. The model starts from the packaged all-MiniLM-L6-v2 with a new scoring head.

A tenth of the chunks is held out whole (no held-out sentence is ever read inside a training passage): the summary
gives how often a held-out query's own chunk comes first among the hybrid retriever's top --check_depth candidates,
in the hybrid's own order and reranked by the trained model: the reranker is worth its cost only if it wins there.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules

from cli import run_main  # noqa: E402
from config import generation_settings  # noqa: E402
from documents import Chunk, load_chunks  # noqa: E402
from errors import InputError  # noqa: E402
from finetune.pairs import Pair, document_pairs, raft_pairs, split_by_chunk  # noqa: E402
from finetune.raft_dataset import load_records  # noqa: E402
from hardware import compute_dtype  # noqa: E402
from retrieval import DEFAULT_EMBEDDING_MODEL, build_retrievers, embedding_model_path  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", required=True, help="the documents folder: its chunks are the passages")
    p.add_argument("--raft_run", help="raft.py's output folder, whose chunk size is used (default: raft.yaml's)")
    p.add_argument("--chunk_size", type=int, help="characters per chunk (default: the generation run's)")
    p.add_argument("--data_path", nargs="+", help="raft.jsonl file(s): their questions and oracles join the pairs")
    p.add_argument("--output", required=True, help="folder of the trained CrossEncoder")
    p.add_argument("--base", default=DEFAULT_EMBEDDING_MODEL, help="the model to start from")
    p.add_argument("--negatives", type=int, default=3, help="hard negatives per query (default 3)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32, help="(query, passage) pairs per step (32: 8 queries)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--check_depth", type=int, default=10, help="candidates the held-out check reranks (default 10)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def hard_negatives(pairs: list[Pair], chunks: list[Chunk], count: int) -> list[list[str]]:
    """Per pair, the `count` other chunks the hybrid retriever (BM25 and dense) ranks highest for its query."""
    hybrid = build_retrievers(chunks, ["hybrid"])["hybrid"]
    rankings = hybrid.rank([p.query for p in pairs], count + 1)
    return [[chunks[i].text for i in ranking if chunks[i].text != pair.chunk][:count]
            for pair, ranking in zip(pairs, rankings)]


def ranked_lists(pairs: list[Pair], negatives: list[list[str]]) -> dict[str, list]:
    """One row per query: its passage first, then its hard negatives, labelled 1 and 0s."""
    return {"query": [p.query for p in pairs], "passages": [[p.passage, *ns] for p, ns in zip(pairs, negatives)],
            "labels": [[1.0] + [0.0] * len(ns) for ns in negatives]}


def first_place_shares(model, pairs: list[Pair], chunks: list[Chunk], depth: int) -> tuple[float, float]:
    """How often a held-out query's own chunk comes first among the hybrid retriever's top `depth`: in the hybrid's
    order, and reranked by the model (a query whose chunk is not among them is a miss for both)."""
    hybrid = build_retrievers(chunks, ["hybrid"])["hybrid"]
    first_stage = reranked = 0
    for pair, ranking in zip(pairs, hybrid.rank([p.query for p in pairs], depth)):
        candidates = [chunks[i].text for i in ranking]
        scores = model.predict([(pair.query, c) for c in candidates], show_progress_bar=False)
        first_stage += candidates[0] == pair.chunk
        reranked += candidates[int(np.argmax(scores))] == pair.chunk
    return first_stage / len(pairs), reranked / len(pairs)


def train(args) -> int:
    rng = random.Random(args.seed)
    generation, _ = generation_settings(args.raft_run, "raft.yaml")
    _, chunks, _ = load_chunks(args.documents, "", True, args.chunk_size or generation["chunk_size"])
    pairs = document_pairs([c.text for c in chunks], rng) + (raft_pairs(load_records(args.data_path))
                                                              if args.data_path else [])
    if len(pairs) < 10:
        raise InputError(f"{args.documents} gives {len(pairs)} query/passage pairs: at least 10 are needed")
    rng.shuffle(pairs)
    held_out, train_pairs = split_by_chunk(pairs, rng)
    held_chunks = {p.chunk for p in held_out}
    train_chunks = [c for c in chunks if c.text not in held_chunks]

    import datasets
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import ListNetLoss
    model = CrossEncoder(embedding_model_path(args.base), num_labels=1, device="cpu")
    dtype, why = compute_dtype("auto", "cpu")
    lists = ranked_lists(train_pairs, hard_negatives(train_pairs, train_chunks, args.negatives))
    data = datasets.Dataset.from_dict(lists)
    training = CrossEncoderTrainingArguments(
        output_dir=args.output, num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=max(1, args.batch_size // (1 + args.negatives)), warmup_steps=0.1,
        seed=args.seed, bf16=dtype == "bfloat16", save_strategy="no", report_to=[], logging_steps=20, use_cpu=True)
    # A listwise loss (the softmax of a query's scores against its labels): it learns only how each query's passage
    # compares with its negatives. A pointwise one (binary cross-entropy, positives weighed up) learned the prior
    # alone on data/: every score within 0.508-0.515.
    loss = ListNetLoss(model)
    CrossEncoderTrainer(model=model, args=training, train_dataset=data, loss=loss).train()
    model.save(args.output)
    hybrid_first, reranked_first = first_place_shares(model, held_out, chunks, args.check_depth)
    print(f"trained a cross-encoder from {args.base} on {len(train_pairs)} queries x (1 passage + {args.negatives} "
          f"hard negatives) for {args.epochs} epochs ({dtype}: {why}); held-out queries ({len(held_out)}, of "
          f"{len(held_chunks)} chunks never trained on) whose own chunk comes first among the hybrid's top "
          f"{args.check_depth}: {hybrid_first:.2f} in its order, {reranked_first:.2f} reranked; the model is in "
          f"{args.output}")
    if reranked_first > hybrid_first:
        print(f"it beats the hybrid's order on held-out queries: check it with bench/rerank.py --model {args.output} "
              "on every kind of question, then set reranker to it")
    else:
        print("it does not beat the hybrid's order on held-out queries: keep reranker: none (docs/retrieval.md, "
              "\"Training a cross-encoder on your documents\")")
    return 0


def main(argv=None) -> int:
    return run_main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
