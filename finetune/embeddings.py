"""Fine-tune the retriever's embedding model on RAFT data: each generated question with its oracle chunk is a
training pair, every other chunk of the batch a negative (in-batch negatives). On a CPU this takes minutes.

  python finetune/embeddings.py --data_path output/raft.jsonl --output models/minilm-raft
  # then, in raft_eval_config.yaml (or chat.py -c with it):  embedding_model: models/minilm-raft

The questions are the teacher's, about your documents: the model learns your vocabulary (product names,
abbreviations) and how a question relates to the passage that answers it. Keep the eval questions out of the
training data (raft_eval.py --draft_from writes such a file). A tenth of the questions is held out: the summary
shows their retrieval accuracy among the training chunks before and after, so you see whether it paid.
"""
import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules

from finetune.raft_dataset import DataError, load_records  # noqa: E402
from hardware import compute_dtype  # noqa: E402
from retrieval import DEFAULT_EMBEDDING_MODEL, Embedder, embedding_model_path  # noqa: E402


def training_pairs(records: list[dict]) -> list[tuple[str, str]]:
    """(question, oracle chunk) of every example with a chain-of-thought answer; refusals and repeats left out."""
    pairs, seen = [], set()
    for record in records:
        question, oracle = record.get("question"), record.get("oracle_context")
        if str(record.get("id", "")).startswith("refusal") or not question or not oracle or question in seen:
            continue
        seen.add(question)
        pairs.append((question, oracle))
    return pairs


def accuracy_at_1(embedder: Embedder, pairs: list[tuple[str, str]], chunks: list[str]) -> float:
    """Share of questions whose own chunk is the nearest of `chunks`."""
    questions = embedder.embed([q for q, _ in pairs])
    passages = embedder.embed(chunks)
    best = (questions @ passages.T).argmax(axis=1)
    return sum(chunks[b] == oracle for b, (_, oracle) in zip(best, pairs)) / len(pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", nargs="+", required=True, help="raft.jsonl file(s) written by raft.py")
    p.add_argument("--output", required=True, help="folder of the tuned model (a sentence-transformers folder)")
    p.add_argument("--base", default=DEFAULT_EMBEDDING_MODEL, help=f"the model to start from ({DEFAULT_EMBEDDING_MODEL})")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=32, help="pairs per batch: the other 31 chunks are negatives")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    try:
        pairs = training_pairs(load_records(args.data_path))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(pairs) < 10:
        print(f"error: {', '.join(args.data_path)} holds {len(pairs)} question/chunk pairs: at least 10 are needed",
              file=sys.stderr)
        return 2
    random.Random(args.seed).shuffle(pairs)
    held_out, train = pairs[:max(1, len(pairs) // 10)], pairs[max(1, len(pairs) // 10):]
    chunks = sorted({oracle for _, oracle in pairs})

    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    before = accuracy_at_1(Embedder(args.base, dtype="float32"), held_out, chunks)
    model = SentenceTransformer(embedding_model_path(args.base), device="cpu")
    dtype, why = compute_dtype("auto", "cpu")
    training = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.output) / "checkpoints"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, warmup_steps=0.1, seed=args.seed, bf16=dtype == "bfloat16",
        save_strategy="no", report_to=[], logging_steps=10, batch_sampler="no_duplicates", use_cpu=True)
    dataset = datasets.Dataset.from_dict({"anchor": [q for q, _ in train], "positive": [c for _, c in train]})
    SentenceTransformerTrainer(model=model, args=training, train_dataset=dataset,
                               loss=MultipleNegativesRankingLoss(model)).train()
    model.save_pretrained(args.output)
    after = accuracy_at_1(Embedder(args.output, dtype="float32"), held_out, chunks)
    print(f"trained {args.base} on {len(train)} question/chunk pairs for {args.epochs} epochs ({dtype}: {why}); "
          f"held-out accuracy@1 among {len(chunks)} chunks: {before:.2f} before, {after:.2f} after "
          f"({len(held_out)} questions); the model is in {args.output}: set embedding_model to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
