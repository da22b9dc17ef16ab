"""Does a reranker beat the fused ranking on every kind of question? Prints numbers; asserts nothing.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py --model PATH/TO/CROSS-ENCODER [--model ANOTHER ...]
      [--embedding_model models/minilm-docs]

For each cross-encoder given (a sentence-transformers CrossEncoder folder, such as ms-marco-MiniLM-L-6-v2, or the
same training run with several seeds) over data/ with the shipped retriever settings:
recall@1/3/5/7 on the dev set's questions by kind (paraphrase, abbreviation, typo, multi: found at k when the top k
hold every passage the question needs) and on eval_llama.json's plain questions (found when the top k hold most of
the gold answer's content words). The reranker's depth and weight are chosen by 5-fold cross-validation over the
dev questions by the worst kind's mean recall (not the mean over all kinds): each dev question is scored with what
the other folds chose, the plain questions with what all the dev questions chose. With several models, their mean
follows. `--embedding_model` puts a tuned bi-encoder (finetune/embeddings.py) in the hybrid's dense half. Last, what
a query costs on this machine with and without the reranker.
"""
import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402
from config import EVAL_SCHEMA, load_config  # noqa: E402
from documents import load_chunks  # noqa: E402
from rerank import CrossEncoderScorer, mixed_order  # noqa: E402
from retrieval import build_retriever, settings_from_config  # noqa: E402

# bench/retrieval.py shares its name with the project's retrieval.py: load it by path for its dev-set helpers.
_spec = importlib.util.spec_from_file_location("retrieval_bench", ROOT / "bench" / "retrieval.py")
retrieval_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(retrieval_bench)
KS = retrieval_bench.KS

DEPTHS, WEIGHTS, FOLDS, PLAIN = (10, 20), (0.3, 0.5, 0.7, 1.0), 5, "plain (eval_llama.json)"


def question_sets(chunks) -> dict:
    """name -> (questions, what each needs: the chunk sets of its quotes, or the gold answer for plain questions)."""
    dev = [i for i in json.loads((ROOT / "eval" / "dev_questions.json").read_text()) if i["support"]]
    needs = retrieval_bench.needed_chunks(dev, chunks)
    sets = {}
    for kind in sorted({i["kind"] for i in dev}):
        picked = [(i["question"], n) for i, n in zip(dev, needs) if i["kind"] == kind]
        sets[f"dev: {kind}"] = ([q for q, _ in picked], [n for _, n in picked])
    plain = json.loads((ROOT / "eval_llama.json").read_text())
    sets[PLAIN] = ([i["question"] for i in plain], [i["answer"] for i in plain])
    return sets


def recall_row(name, rankings, wanted, chunks) -> list[float]:
    if name == PLAIN:
        return [metrics.support_recall(rankings, chunks, wanted, k) for k in KS]
    return retrieval_bench.recalls(rankings, wanted)


def reorder(firsts, scores, depth, weight):
    return [mixed_order(first[:depth], s[:depth], weight) + first[depth:] for first, s in zip(firsts, scores)]


def choose_on(items, sets, firsts, scores, chunks):
    """The (depth, weight) whose worst dev kind, over `items` ((set name, question index) pairs), is best."""
    by_kind = {}
    for name, i in items:
        by_kind.setdefault(name, []).append(i)

    def worst(depth, weight):
        return min(sum(recall_row(name, reorder([firsts[name][i] for i in idx], [scores[name][i] for i in idx],
                                                depth, weight), [sets[name][1][i] for i in idx], chunks)) / len(KS)
                   for name, idx in by_kind.items())
    return max(((d, w) for d in DEPTHS for w in WEIGHTS), key=lambda c: worst(*c))


def cross_validated(sets, firsts, scores, chunks) -> tuple[dict, tuple]:
    """Recall per question set with the reranker, every dev question reordered with the (depth, weight) chosen on
    the other folds, the plain questions with the choice of all the dev questions (also returned)."""
    dev = [(name, i) for name in sets if name != PLAIN for i in range(len(sets[name][0]))]
    random.Random(0).shuffle(dev)
    folds = [dev[f::FOLDS] for f in range(FOLDS)]
    chosen_for = {}
    for f, fold in enumerate(folds):
        rest = [item for g, other in enumerate(folds) if g != f for item in other]
        chosen = choose_on(rest, sets, firsts, scores, chunks)
        chosen_for.update({item: chosen for item in fold})
    overall = choose_on(dev, sets, firsts, scores, chunks)
    rows = {}
    for name, (questions, wanted) in sets.items():
        ranked = [reorder([firsts[name][i]], [scores[name][i]], *chosen_for.get((name, i), overall))[0]
                  for i in range(len(questions))]
        rows[name] = recall_row(name, ranked, wanted, chunks)
    return rows, overall


def print_row(name, retriever, row):
    print(f"{name:26} {retriever:34}" + "".join(f"{v:7.2f}" for v in row))


def print_mean(runs: list[dict]):
    """The mean over seeds of each question set's recall, with the lowest seed's value at k=5 beside it."""
    for name in runs[0]:
        rows = [run[name] for run in runs]
        mean = [sum(values) / len(values) for values in zip(*rows)]
        print_row(name, f"+ mean of {len(runs)} (lowest @5 {min(r[KS.index(5)] for r in rows):.2f})", mean)


def cost(hybrid, scorer, chunks, questions):
    started = time.perf_counter()
    firsts = hybrid.rank(questions, max(DEPTHS))
    first_stage = (time.perf_counter() - started) / len(questions)
    started = time.perf_counter()
    for question, first in zip(questions, firsts):
        scorer.scores(question, [chunks[i].text for i in first])
    reranking = (time.perf_counter() - started) / len(questions)
    print(f"\ncost per query on this machine: hybrid {1000 * first_stage:.1f} ms; reranking its top {max(DEPTHS)} "
          f"with the cross-encoder {1000 * reranking:.1f} ms more ({(first_stage + reranking) / first_stage:.0f}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a cross-encoder folder (repeat once per seed)")
    p.add_argument("--embedding_model", help="the hybrid's embedding model (default: raft_eval_config.yaml's)")
    args = p.parse_args()
    cfg = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)
    cfg["embedding_model"] = args.embedding_model or cfg["embedding_model"]
    _, chunks, _ = load_chunks(str(ROOT / "data"), "", True, 1000)
    hybrid = build_retriever(chunks, "hybrid", cfg["embedding_model"], settings=settings_from_config(cfg))
    sets = question_sets(chunks)
    firsts = {name: hybrid.rank(questions, 50) for name, (questions, _) in sets.items()}
    print(f"{'question set':26} {'ranking':34}" + "".join(f"{'@' + str(k):>7}" for k in KS))
    shipped = f"hybrid, {Path(args.embedding_model).name}" if args.embedding_model else "hybrid (the shipped default)"
    for name, (_, wanted) in sets.items():
        print_row(name, shipped, recall_row(name, firsts[name], wanted, chunks))
    runs = []
    for model in args.model:
        scorer = CrossEncoderScorer(model)
        scores = {name: [scorer.scores(q, [chunks[i].text for i in first[:max(DEPTHS)]])
                         for q, first in zip(questions, firsts[name])] for name, (questions, _) in sets.items()}
        rows, (depth, weight) = cross_validated(sets, firsts, scores, chunks)
        runs.append(rows)
        for name, row in rows.items():
            print_row(name, f"+ {Path(model).name}", row)
        print(f"  ({Path(model).name}: all dev questions choose depth {depth}, weight {weight})")
    if len(runs) > 1:
        print_mean(runs)
    cost(hybrid, CrossEncoderScorer(args.model[0]), chunks, sets[PLAIN][0])


if __name__ == "__main__":
    main()
