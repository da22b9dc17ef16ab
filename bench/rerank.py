"""Does a reranker beat the fused ranking on every kind of question? Prints numbers; asserts nothing.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py --model PATH/TO/CROSS-ENCODER [--model ANOTHER ...]
      [--llm http://127.0.0.1:8001/v1 [--llm_mode pointwise] [--llm_depth 10]] [--embedding_model models/minilm-docs]

For each cross-encoder given (a sentence-transformers CrossEncoder folder, such as ms-marco-MiniLM-L-6-v2, or the
same training run with several seeds) and for the served model behind --llm (reranker: llm, pointwise and
listwise unless --llm_mode names one), over data/ with the shipped retriever settings:
recall@1/3/5/7 on the dev set's questions by kind (paraphrase, abbreviation, typo, multi: found at k when the top k
hold every passage the question needs) and on eval_llama.json's plain questions (found when the top k hold most of
the gold answer's content words). The reranker's depth and weight are chosen by 5-fold cross-validation over the
dev questions by the worst kind's mean recall (not the mean over all kinds): each dev question is scored with what
the other folds chose, the plain questions with what all the dev questions chose. With several cross-encoders,
their mean follows. The LLM rereads --llm_depth candidates (10: a listwise prompt of 20 chunks of 1,000 characters
is over the 4,096 tokens of a llama.cpp slot); its replies are cached in --cache, so a re-run asks nothing again.
`--embedding_model` puts a tuned bi-encoder (finetune/embeddings.py) in the hybrid's dense half. Last, what a query
costs on this machine with and without each reranker (timed while it scored the questions above).
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
from cli import client_from_config, connect, run_main  # noqa: E402
from config import EVAL_SCHEMA, load_config  # noqa: E402
from documents import load_chunks  # noqa: E402
from rerank import CrossEncoderScorer, LLMScorer, mixed_order  # noqa: E402
from retrieval import build_retriever, settings_from_config  # noqa: E402

# bench/retrieval.py shares its name with the project's retrieval.py: load it by path for its dev-set helpers.
_spec = importlib.util.spec_from_file_location("retrieval_bench", ROOT / "bench" / "retrieval.py")
retrieval_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(retrieval_bench)
KS = retrieval_bench.KS

# The first stage's score falls only from 1 to 0.87 over 10 candidates (reciprocal rank, k = 60: rerank.mixed_order),
# so a reranker weight of 0.3 already lets the reranker decide nearly every order; the small weights let the
# cross-validation find a reranker that only breaks the first stage's near-ties.
DEPTHS, WEIGHTS, FOLDS, PLAIN = (10, 20), (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), 5, "plain (eval_llama.json)"


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


def choose_on(items, sets, firsts, scores, chunks, depths):
    """The (depth, weight) whose worst dev kind, over `items` ((set name, question index) pairs), is best."""
    by_kind = {}
    for name, i in items:
        by_kind.setdefault(name, []).append(i)

    def worst(depth, weight):
        return min(sum(recall_row(name, reorder([firsts[name][i] for i in idx], [scores[name][i] for i in idx],
                                                depth, weight), [sets[name][1][i] for i in idx], chunks)) / len(KS)
                   for name, idx in by_kind.items())
    return max(((d, w) for d in depths for w in WEIGHTS), key=lambda c: worst(*c))


def cross_validated(sets, firsts, scores, chunks, depths) -> tuple[dict, tuple]:
    """Recall per question set with the reranker, every dev question reordered with the (depth, weight) chosen on
    the other folds, the plain questions with the choice of all the dev questions (also returned)."""
    dev = [(name, i) for name in sets if name != PLAIN for i in range(len(sets[name][0]))]
    random.Random(0).shuffle(dev)
    folds = [dev[f::FOLDS] for f in range(FOLDS)]
    chosen_for = {}
    for f, fold in enumerate(folds):
        rest = [item for g, other in enumerate(folds) if g != f for item in other]
        chosen = choose_on(rest, sets, firsts, scores, chunks, depths)
        chosen_for.update({item: chosen for item in fold})
    overall = choose_on(dev, sets, firsts, scores, chunks, depths)
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


def scored(scorer, sets, firsts, chunks, depth) -> tuple[dict, float]:
    """Each question's reranker scores of its first `depth` candidates, by question set; and the seconds spent."""
    started = time.perf_counter()
    scores = {}
    for name, (questions, _) in sets.items():
        heads = [(q, [chunks[i].text for i in first[:depth]]) for q, first in zip(questions, firsts[name])]
        scores[name] = scorer.scores_of(heads)      # an LLM gets the whole set at once: the server's slots all busy
    return scores, time.perf_counter() - started


def llm_client(args, cfg):
    """A client of the --llm server, checked, its replies cached in --cache."""
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    client = client_from_config(cfg, args, [args.llm], "", args.cache)
    connect(client, args)
    client.identify_model()
    return client


def llm_contenders(client, args, cfg) -> list[tuple[str, LLMScorer, int]]:
    """(name, scorer, depth) for each --llm_mode."""
    params = {"temperature": 0.0, "max_tokens": cfg["rerank_max_tokens"]}
    prompts = {"pointwise": cfg["rerank_prompt"], "listwise": cfg["rerank_list_prompt"]}
    return [(f"llm {mode}", LLMScorer(client, mode, prompts[mode], params), args.llm_depth) for mode in args.llm_mode]


def print_cost(hybrid, questions, costs: dict, asked: int):
    """What a query costs: the hybrid alone (timed here), and each reranker on top (timed while it scored the
    `asked` questions)."""
    started = time.perf_counter()
    hybrid.rank(questions, max(DEPTHS))
    first_stage = (time.perf_counter() - started) / len(questions)
    print(f"\ncost per query on this machine: hybrid {1000 * first_stage:.1f} ms; reranking on top of it:")
    for name, (seconds, depth, note) in costs.items():
        per_query = seconds / asked
        print(f"  {name:32} its top {depth}: {1000 * per_query:8.1f} ms more "
              f"({(first_stage + per_query) / first_stage:.0f}x){note}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="a cross-encoder folder (repeat once per seed)")
    p.add_argument("--llm", help="an OpenAI-compatible server's base URL: its model reranks (reranker: llm)")
    p.add_argument("--llm_mode", action="append", choices=("pointwise", "listwise"),
                   help="pointwise or listwise (repeatable; default: both)")
    p.add_argument("--llm_depth", type=int, default=10, help="candidates the LLM rereads (10)")
    p.add_argument("--cache", default=str(ROOT / "output" / "bench" / "rerank_llm.sqlite"),
                   help="where the LLM's replies are cached (output/bench/rerank_llm.sqlite)")
    p.add_argument("-k", "--api_key", default="EMPTY", help="the --llm server's key (or the API_KEY variable)")
    p.add_argument("--embedding_model", help="the hybrid's embedding model (default: raft_eval_config.yaml's)")
    args = p.parse_args(argv)
    if not args.model and not args.llm:
        p.error("name a reranker: --model (a cross-encoder) or --llm (a served model)")
    args.llm_mode = args.llm_mode or ["pointwise", "listwise"]
    return run_main(compare, args, f"interrupted: the LLM's replies so far are kept in {args.cache}")


def compare(args) -> int:
    """The shipped hybrid, then each reranker on top of it, by question set; then the costs."""
    cfg = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)
    cfg["embedding_model"] = args.embedding_model or cfg["embedding_model"]
    _, chunks, _ = load_chunks(str(ROOT / "data"), "", True, 1000)
    cache = cfg["index_cache"] and str(ROOT / cfg["index_cache"])      # the chunks' embeddings, shared with raft_eval
    hybrid = build_retriever(chunks, "hybrid", cfg["embedding_model"], cache, settings=settings_from_config(cfg))
    sets = question_sets(chunks)
    asked = sum(len(questions) for questions, _ in sets.values())
    firsts = {name: hybrid.rank(questions, 50) for name, (questions, _) in sets.items()}
    print(f"{'question set':26} {'ranking':34}" + "".join(f"{'@' + str(k):>7}" for k in KS))
    shipped = f"hybrid, {Path(args.embedding_model).name}" if args.embedding_model else "hybrid (the shipped default)"
    for name, (_, wanted) in sets.items():
        print_row(name, shipped, recall_row(name, firsts[name], wanted, chunks))
    contenders = [(Path(m).name, CrossEncoderScorer(m), max(DEPTHS)) for m in args.model]
    client = llm_client(args, cfg) if args.llm else None
    contenders += llm_contenders(client, args, cfg) if client else []
    cross_encoder_runs, costs = [], {}
    for name, scorer, depth in contenders:
        cached_before = scorer.client.usage.cached if isinstance(scorer, LLMScorer) else 0
        scores, seconds = scored(scorer, sets, firsts, chunks, depth)
        depths = [d for d in DEPTHS if d <= depth] or [depth]
        rows, (chosen_depth, weight) = cross_validated(sets, firsts, scores, chunks, depths)
        for set_name, row in rows.items():
            print_row(set_name, f"+ {name}", row)
        note = f" ({scorer.unreadable} replies unreadable)" if isinstance(scorer, LLMScorer) else ""
        print(f"  ({name}: all dev questions choose depth {chosen_depth}, weight {weight}{note})")
        cached = scorer.client.usage.cached - cached_before if isinstance(scorer, LLMScorer) else 0
        costs[name] = (seconds, depth, f"; {cached} replies came from the cache" if cached else "")
        if not isinstance(scorer, LLMScorer):
            cross_encoder_runs.append(rows)
    if len(cross_encoder_runs) > 1:
        print_mean(cross_encoder_runs)
    print_cost(hybrid, sets[PLAIN][0], costs, asked)
    if client is not None:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
