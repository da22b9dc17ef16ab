"""How well the quality filters (quality.py) do on a labelled set with planted faults (tests/quality_set.py).
Prints numbers; asserts nothing (tests/test_quality.py holds the targets).

  .venv/bin/python bench/quality_filters.py

Per filter: the planted faults of its kind, how many it caught (recall), how many it dropped and how many of those
were such faults (precision); then the good records dropped, the faults caught by any filter, and the time. The
duplicate filter runs with each method, jaccard and embedding, over a sweep of thresholds, in the same run; and
the round trip with each retriever and top-k; last, the time on 5,000 questions over 1,200 chunks.
"""
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import RAFT_SCHEMA, load_config  # noqa: E402
from quality import QualityStage  # noqa: E402
from tests.quality_set import build  # noqa: E402


def measure(chunks, labelled, settings) -> dict:
    """Per kind of record (each good kind, each fault kind): how many, how many dropped; per filter: how many it
    dropped and how many of those were faults."""
    started = time.perf_counter()
    judged = QualityStage(settings, chunks).judge([item.qa for item in labelled])
    seconds = time.perf_counter() - started
    kinds, filters = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for item, qa in zip(labelled, judged):
        kinds[item.kind]["records"] += 1
        kinds[item.kind]["dropped"] += bool(qa.dropped)
        if qa.dropped:
            filters[qa.dropped.filter]["dropped"] += 1
            filters[qa.dropped.filter]["faults"] += item.fault
    return {"kinds": kinds, "filters": filters, "seconds": seconds,
            "faults": sum(item.fault for item in labelled),
            "caught": sum(c["dropped"] for k, c in kinds.items() if not k.startswith("good")),
            "good": sum(not item.fault for item in labelled),
            "good_dropped": sum(c["dropped"] for k, c in kinds.items() if k.startswith("good"))}


def show(name: str, m: dict):
    print(f"\n{name}: {m['faults']} planted faults and {m['good']} good records, judged in {m['seconds']:.2f} s")
    print(f"  {'record':40} {'records':>7} {'dropped':>7} {'share':>6}")
    for kind, c in sorted(m["kinds"].items()):
        print(f"  {kind:40} {c['records']:7} {c['dropped']:7} {c['dropped'] / c['records']:6.2f}")
    print(f"  {'filter':40} {'dropped':>7} {'faults':>7} {'precision':>9}")
    for name_, c in sorted(m["filters"].items()):
        print(f"  {name_:40} {c['dropped']:7} {c['faults']:7} {c['faults'] / c['dropped']:9.2f}")
    print(f"  faults caught: {m['caught']} of {m['faults']} ({m['caught'] / m['faults']:.2f}); good records dropped: "
          f"{m['good_dropped']} of {m['good']} ({m['good_dropped'] / m['good']:.2f})")


def main():
    chunks, labelled = build()
    defaults = load_config(str(ROOT / "raft.yaml"), RAFT_SCHEMA)["quality"]
    show("the defaults of raft.yaml", measure(chunks, labelled, defaults))
    goods = [item for item in labelled if not item.fault]
    duplicates = goods + [item for item in labelled if "duplicate" in item.kind]
    print("\nthe duplicate filter alone, by method and threshold (the good records and the planted duplicates):")
    for method, thresholds in (("jaccard", (0.5, 0.6, 0.7, 0.8, 0.9)), ("embedding", (0.75, 0.8, 0.85, 0.9, 0.95))):
        for threshold in thresholds:
            m = measure(chunks, duplicates, {**defaults, "answer_checks": False, "question_checks": False,
                                             "round_trip": False, "duplicate_method": method,
                                             "duplicate_threshold": threshold})
            print(f"  {method:9} {threshold:.2f}: " + by_kind(m, "duplicate") + f", {m['seconds']:.2f} s")
    round_trip = goods + [item for item in labelled if item.kind in ("asked of the wrong chunk",
                                                                      "copied from the chunk")]
    print("\nthe round trip alone, by retriever and top-k (the good records and the planted round-trip faults):")
    for retriever in ("bm25", "hybrid"):
        for k in (5, 10, 20):
            m = measure(chunks, round_trip, {**defaults, "answer_checks": False, "question_checks": False,
                                             "duplicates": False, "round_trip_retriever": retriever,
                                             "round_trip_k": k})
            print(f"  {retriever:6} top-{k:<2}: " + by_kind(m, "chunk") + f", {m['seconds']:.2f} s")
    scale(defaults)


def scale(defaults: dict, questions: int = 5000, chunks_count: int = 1200):
    """The filters' time on a synthetic run of `questions` over `chunks_count` chunks, judged in windows of 2,000 as
    raft.py does: each duplicate method, in the same run."""
    import random
    from documents import Chunk
    from raft_utils import QA
    from tests.quality_set import answer_quoting
    rng = random.Random(0)
    things = ["context window", "tokenizer", "learning rate", "GPU memory", "licence", "batch size", "layers"]
    chunks = [Chunk(" ".join(f"Fact {c}.{s}: the {rng.choice(things)} of model {c % 50} is {rng.randint(1, 9999)} "
                             "units." for s in range(14)), f"doc{c // 10}.md") for c in range(chunks_count)]
    qas = []
    for i in range(questions):
        c = rng.randrange(chunks_count)
        qas.append(QA(c, f"What is the {rng.choice(things)} of model {c % 50} in fact {c}.{i % 14} ({i})?",
                      answer_quoting(chunks[c].text.split(". ")[i % 14], "x"), True))
    print(f"\n{questions} questions over {chunks_count} chunks, in windows of 2,000:")
    for method in ("embedding", "jaccard"):
        started = time.perf_counter()
        stage = QualityStage({**defaults, "duplicate_method": method}, chunks)
        ready = time.perf_counter()
        for start in range(0, questions, 2000):
            stage.judge(qas[start:start + 2000])
        done = time.perf_counter()
        print(f"  duplicates by {method:9}: set-up {ready - started:.1f} s (retriever, model), judging "
              f"{done - ready:.1f} s ({1000 * (done - ready) / questions:.1f} ms a question)")


def by_kind(m: dict, fault_word: str) -> str:
    """'caught 5 of 5 exact duplicate, same chunk; ...; dropped 2 of 70 good: a user's wording ...'"""
    parts = [f"{c['dropped']}/{c['records']} {kind}" for kind, c in sorted(m["kinds"].items())
             if fault_word in kind or kind.startswith("good")]
    return "dropped " + "; ".join(parts)


if __name__ == "__main__":
    main()
