"""Fine-tune the retriever's embedding model on your own data: each training pair is a query with the passage it
must find, every other chunk of the batch a negative (in-batch negatives). On a CPU this takes minutes. Two
sources of pairs, alone or together:

  python finetune/embeddings.py --documents data/ --output models/minilm-docs          # no LLM needed
  python finetune/embeddings.py --data_path output/raft.jsonl --output models/minilm-raft
  # then, in raft_eval_config.yaml (or chat.py -c with it):  embedding_model: models/minilm-docs

--documents: the documents themselves (the inverse cloze task). Each sentence of a chunk is a query, and the
chunk with that sentence cut out is the passage it must find: the model learns which passages belong with which
statements in your documents' vocabulary, with no question written by anyone. They are chunked as the generation
run did (--raft_run names raft.py's output folder; without it, raft.yaml's chunk_size; --chunk_size overrides).
--data_path: the teacher's RAFT questions with their oracle chunks. Keep the eval questions out of the training
data (raft_eval.py --draft_from writes such a file).

A tenth of the pairs (at most 1,000) is held out: the summary shows how often a held-out query finds its own
passage among the chunks (up to 10,000 of them), before and after, so you see whether it paid.
"""
import argparse
import collections
import functools
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules

from cli import run_main  # noqa: E402
from config import generation_settings  # noqa: E402
from documents import load_chunks  # noqa: E402
from errors import InputError  # noqa: E402
from finetune.pairs import Pair, document_pairs, raft_pairs, split_by_chunk  # noqa: E402
from finetune.raft_dataset import load_records  # noqa: E402
from hardware import compute_dtype  # noqa: E402
from retrieval import DEFAULT_EMBEDDING_MODEL, Embedder, embedding_model_path  # noqa: E402

MAX_CHECKED_CHUNKS = 10_000   # the held-out check ranks among this many chunks at most (embedded twice)


def distinct_chunk_batches(chunk_of: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of pair indices in which no chunk appears twice: in-batch negatives must really be other chunks (a
    second sentence of the same chunk, or a second question about it, is no negative). Pairs are dealt out one per
    chunk in turn, so that a chunk with many pairs spreads over many batches; a batch of one pair teaches nothing
    and is left out."""
    rng = random.Random(seed)
    by_chunk: dict[int, list[int]] = {}
    for index, chunk in enumerate(chunk_of):
        by_chunk.setdefault(chunk, []).append(index)
    queues = list(by_chunk.values())
    for queue in queues:
        rng.shuffle(queue)
    pending = collections.deque()
    while queues:
        rng.shuffle(queues)
        pending += [queue.pop() for queue in queues]
        queues = [queue for queue in queues if queue]
    batches = []
    while pending:
        batch, used, skipped = [], set(), []
        while pending and len(batch) < batch_size:
            index = pending.popleft()
            if chunk_of[index] in used:
                skipped.append(index)        # where two rounds meet: it goes into the next batch
            else:
                batch.append(index)
                used.add(chunk_of[index])
        pending.extendleft(reversed(skipped))
        if len(batch) > 1:
            batches.append(batch)
    return batches


def distinct_chunk_sampler(chunk_of: list[int]):
    """The trainer's batch sampler: distinct_chunk_batches, dealt anew each epoch."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    @functools.lru_cache(maxsize=1)     # the trainer asks an epoch's length several times, then iterates it
    def dealt(batch_size: int, seed: int) -> list[list[int]]:
        return distinct_chunk_batches(chunk_of, batch_size, seed)

    class DistinctChunkSampler(DefaultBatchSampler):
        def __iter__(self):
            return iter(dealt(self.batch_size, self.seed + self.epoch))

        def __len__(self):
            return len(dealt(self.batch_size, self.seed + self.epoch))

    return DistinctChunkSampler


def checked_chunks(held_out: list[Pair], chunks: list[str], rng: random.Random) -> list[str]:
    """The chunks the held-out check ranks: the held-out pairs' own, then others drawn at random, up to
    MAX_CHECKED_CHUNKS."""
    own = {pair.chunk for pair in held_out}
    others = [chunk for chunk in chunks if chunk not in own]
    return sorted(own) + rng.sample(others, min(len(others), max(0, MAX_CHECKED_CHUNKS - len(own))))


def accuracy_at_1(embedder: Embedder, pairs: list[Pair], chunks: list[str]) -> float:
    """Share of queries whose own passage scores above every other chunk."""
    queries = embedder.embed([p.query for p in pairs])
    own = np.einsum("ij,ij->i", queries, embedder.embed([p.passage for p in pairs]))
    vectors = embedder.embed(chunks)
    position = {chunk: i for i, chunk in enumerate(chunks)}
    found = 0
    for start in range(0, len(pairs), 100):        # 100 queries against every chunk at a time: bounded memory
        rows = slice(start, start + 100)
        scores = queries[rows] @ vectors.T
        scores[np.arange(len(scores)), [position[p.chunk] for p in pairs[rows]]] = -np.inf
        found += int(np.sum(own[rows] > scores.max(axis=1)))
    return found / len(pairs)


def training_pairs(args, rng: random.Random) -> list[Pair]:
    pairs = []
    if args.documents:
        generation, _ = generation_settings(args.raft_run, "raft.yaml")
        _, chunks, _ = load_chunks(args.documents, "", True, args.chunk_size or generation["chunk_size"])
        pairs += document_pairs([c.text for c in chunks], rng)
    if args.data_path:
        pairs += raft_pairs(load_records(args.data_path))
    return pairs


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", help="a documents folder: pairs cut from its chunks (no LLM needed)")
    p.add_argument("--raft_run", help="raft.py's output folder, whose chunk size is used (default: raft.yaml's)")
    p.add_argument("--chunk_size", type=int, help="characters per chunk (default: the generation run's)")
    p.add_argument("--data_path", nargs="+", help="raft.jsonl file(s) written by raft.py: question/oracle pairs")
    p.add_argument("--output", required=True, help="folder of the tuned model (a sentence-transformers folder)")
    p.add_argument("--base", default=DEFAULT_EMBEDDING_MODEL, help=f"the model to start from ({DEFAULT_EMBEDDING_MODEL})")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=32, help="pairs per batch: the other 31 chunks are negatives")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if not args.documents and not args.data_path:
        p.error("give --documents, --data_path or both")
    return args


def train(args) -> int:
    rng = random.Random(args.seed)
    pairs = training_pairs(args, rng)
    if len(pairs) < 10:
        sources = ", ".join(filter(None, [args.documents, *(args.data_path or [])]))
        raise InputError(f"{sources} holds {len(pairs)} query/passage pairs: at least 10 are needed")
    rng.shuffle(pairs)
    held_out, train = split_by_chunk(pairs, rng)
    chunks = sorted({pair.chunk for pair in pairs})
    position = {chunk: i for i, chunk in enumerate(chunks)}
    checked = checked_chunks(held_out, chunks, rng)

    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    before = accuracy_at_1(Embedder(args.base, dtype="float32"), held_out, checked)
    model = SentenceTransformer(embedding_model_path(args.base), device="cpu")
    dtype, why = compute_dtype("auto", "cpu")
    training = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output) / "checkpoints"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, warmup_steps=0.1, seed=args.seed, bf16=dtype == "bfloat16",
        save_strategy="no", report_to=[], logging_steps=10, use_cpu=True,
        batch_sampler=distinct_chunk_sampler([position[pair.chunk] for pair in train]))
    dataset = datasets.Dataset.from_dict({"anchor": [p.query for p in train], "positive": [p.passage for p in train]})
    SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset,
                               loss=MultipleNegativesRankingLoss(model)).train()
    model.save_pretrained(args.output)
    after = accuracy_at_1(Embedder(args.output, dtype="float32"), held_out, checked)
    print(f"trained {args.base} on {len(train)} query/passage pairs for {args.epochs} epochs ({dtype}: {why}); "
          f"held-out accuracy@1 among {len(checked)} chunks: {before:.2f} before, {after:.2f} after "
          f"({len(held_out)} queries); the model is in {args.output}: set embedding_model to it")
    return 0


def main(argv=None) -> int:
    return run_main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
