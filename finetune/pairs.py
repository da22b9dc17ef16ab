"""Training pairs for the retriever's models (finetune/embeddings.py tunes the bi-encoder on them,
finetune/reranker.py trains the cross-encoder): a query with the passage it must find, cut from the documents (the
inverse cloze task) or from RAFT examples, and the held-out split by whole chunks."""
import collections
import random
import re
from dataclasses import dataclass

MIN_QUERY_WORDS = 6       # shorter sentences ("See below.", headings) say too little to be a query
KEEP_SENTENCE = 0.1       # share of document pairs whose passage keeps the query's sentence, so a literal match
                          # still counts (the inverse cloze task's usual setting)
MAX_HELD_OUT = 1000       # held-out pairs: a tenth of them, up to this many


@dataclass(frozen=True)
class Pair:
    query: str
    passage: str     # what the query must find: its chunk, or for a document pair the chunk without the query
    chunk: str       # the whole chunk: no two pairs of one chunk share a batch, and the held-out check ranks these


def raft_pairs(records: list[dict]) -> list[Pair]:
    """(question, oracle chunk) of every example with a chain-of-thought answer; refusals and repeats left out."""
    pairs, seen = [], set()
    for record in records:
        question, oracle = record.get("question"), record.get("oracle_context")
        if str(record.get("id", "")).startswith("refusal") or not question or not oracle or question in seen:
            continue
        seen.add(question)
        pairs.append(Pair(question, oracle, oracle))
    return pairs


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= MIN_QUERY_WORDS]


def document_pairs(chunks: list[str], rng: random.Random) -> list[Pair]:
    """The inverse cloze task: each sentence of a chunk with the chunk it was cut out of."""
    return [Pair(sentence, chunk if rng.random() < KEEP_SENTENCE else chunk.replace(sentence, " "), chunk)
            for chunk in chunks for sentence in sentences(chunk)]


def split_by_chunk(pairs: list[Pair], rng: random.Random) -> tuple[list[Pair], list[Pair]]:
    """(held out, train): about a tenth of the pairs (at most MAX_HELD_OUT), whole chunks at a time, so that no
    held-out sentence can be read inside a training passage of its own chunk (a split by pair inflated the "after"
    figure: the model had seen the answer's text)."""
    chunks = sorted({pair.chunk for pair in pairs})
    rng.shuffle(chunks)
    wanted, held = max(1, min(len(pairs) // 10, MAX_HELD_OUT)), set()
    per_chunk = collections.Counter(pair.chunk for pair in pairs)
    for chunk in chunks:
        if sum(per_chunk[c] for c in held) >= wanted:
            break
        held.add(chunk)
    return [p for p in pairs if p.chunk in held], [p for p in pairs if p.chunk not in held]
