"""The quality stage of RAFT data: filters that drop what a team should not fine-tune on, and a data card.

  python quality.py -o output/              # again on a finished output folder, without the teacher
  python quality.py -o output/ -c my.yaml   # with other settings (raft.yaml's quality section)

raft.py runs it on every window of questions before their records are written; run alone, it reads raft.jsonl and
rewrites the outputs. Either way each question of the teacher goes through the filters of raft.yaml's `quality`
section in this order, and the first that fails drops it with every record made from it:

- answer:      no <ANSWER>: part, an empty one, or a ##begin_quote## span not found in the oracle chunk;
- question:    not a question (no "?" and not worded as one), fewer than min_question_words or more than
               max_question_words words;
- duplicate:   the same question as an earlier one, or a near duplicate (Jaccard of content words, or cosine in the
               retriever's embedding model), within its chunk or across the corpus: the first one is kept;
- round trip:  the project's retriever does not find the question's oracle chunk in its top round_trip_k (the
               question is about another chunk, or none), or finds it first while most of the question is copied
               from one sentence of it (too easy to teach anything);
- grade:       (off by default) the teacher grades the question and answer against a rubric, 1 to 5.

A dropped record goes to filtered_out.jsonl with the filter and the value that dropped it; every record, kept or
not, carries its oracle's rank in the round trip (oracle_rank). The same seed and settings drop the same records.
data_card.md beside the data describes what was kept: counts at each stage and per filter, the questions' lengths,
kinds, sources and chunks, the oracle ranks, examples kept and dropped, and the settings.
"""
import argparse
import collections
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

import format as formats
from cli import add_client_flags, client_from_config, connect, run_main
from config import RAFT_SCHEMA, RUN_RECORD, fill_prompt, load_config
from documents import Chunk, load_chunks
from errors import InputError
from folder_lock import STAGING, FolderLock, swap_in
from raft_utils import QA
from record_writer import FILTERED, STREAM, convert_stream, filtered_line
from retrieval import SearchSettings, build_retriever, load_embedder
from text import content_words, final_answer, normalise


QUESTION_WORDS = re.compile(r"^(?:what|which|who|whom|whose|when|where|why|how|is|are|was|were|can|could|does|do|"
                            r"did|should|will|would|may|might|has|have|had|shall|in which|on which|for which|"
                            r"to what|by how)\b", re.I)
KINDS = (("what", r"what"), ("which", r"which|in which|on which|for which"), ("how", r"how|by how|to what"),
         ("why", r"why"), ("when", r"when"), ("where", r"where"), ("who", r"who|whom|whose"),
         ("yes/no", r"is|are|was|were|can|could|does|do|did|should|will|would|may|might|has|have|had|shall"))


def question_kind(question: str) -> str:
    for kind, words in KINDS:
        if re.match(rf"^(?:{words})\b", question.strip(), re.I):
            return kind
    return "other"


@dataclass(frozen=True)
class Verdict:
    """Why a question was dropped: the filter and the value that dropped it."""
    filter: str
    value: object


# ---- one question at a time ------------------------------------------------------------------------------------
def answer_problem(qa: QA, oracle: str) -> Optional[Verdict]:
    from raft_utils import quotes_verified
    answer = final_answer(qa.cot_answer)
    if answer is None:
        has_mark = "<ANSWER>" in (qa.cot_answer or "")
        return Verdict("answer: empty <ANSWER>:" if has_mark else "answer: no <ANSWER>:", (qa.cot_answer or "")[-80:])
    if "##begin_quote##" in qa.cot_answer and not quotes_verified(qa.cot_answer, oracle):
        return Verdict("answer: quote not in the oracle chunk", qa.cot_answer[:120])
    return None


def question_problem(question: str, settings: dict) -> Optional[Verdict]:
    words = len(question.split())
    if "?" not in question and not QUESTION_WORDS.match(question.strip()):
        return Verdict("question: not a question", question)
    if words < settings["min_question_words"]:
        return Verdict("question: too short", words)
    if words > settings["max_question_words"]:
        return Verdict("question: too long", words)
    return None


def words_of(text: str) -> list[str]:
    """Lower-case words (dots and hyphens kept inside: "3.1", "grouped-query")."""
    return normalise(re.sub(r"[^\w\s.-]", " ", text)).replace(". ", " ").rstrip(".").split()


def copied_share(question: str, oracle: str) -> float:
    """The longest run of the question's words found in one sentence of the oracle, as a share of its words (the
    question word aside): 1.0 for a sentence of the chunk turned into a question."""
    words = words_of(question)
    if words and QUESTION_WORDS.match(words[0]):
        words = words[1:]
    if not words:
        return 0.0
    best = 0
    for sentence in re.split(r"(?<=[.!?])\s+", oracle):
        text = f" {' '.join(words_of(sentence))} "
        for start in range(len(words)):
            length = best + 1
            while start + length <= len(words) and f" {' '.join(words[start:start + length])} " in text:
                best, length = length, length + 1
    return best / len(words)


def numbers_of(text: str) -> frozenset:
    """The numbers a question names ("8B", "80 GB", "3.1", "Fact 0.1.0" -> 8, 80, 3.1, 0.1.0)."""
    return frozenset(re.findall(r"\d+(?:\.\d+)*", text))


# ---- duplicates ------------------------------------------------------------------------------------------------
class Duplicates:
    """Questions kept so far, to find an exact or near duplicate of a new one (kept: the first, in record order).
    jaccard: the share of content words two questions share (their sets' Jaccard index), found through an index of
    each kept set's first words (prefix filtering: two sets that share at least `threshold` of their words share one
    of those, so no pair above the threshold is missed and no run compares every pair); embedding: the cosine of the
    two in an embedding model, against every kept question. Each is checked within the question's chunk and across
    the corpus."""

    def __init__(self, settings: dict):
        self.method, self.threshold = settings["duplicate_method"], settings["duplicate_threshold"]
        self.embedder = load_embedder(settings["embedding_model"], 32, "auto") if self.method == "embedding" \
            else None
        self.exact: dict[str, QA] = {}
        self.kept: list[QA] = []
        self.words: list[frozenset] = []                 # jaccard: each kept question's content words
        self.by_prefix: dict[str, list[int]] = collections.defaultdict(list)
        self.vectors = None                              # embedding: the kept questions' unit vectors, as rows

    def check(self, qas: list[QA]) -> list[Optional[Verdict]]:
        """A verdict per QA (None: not a duplicate); the ones not dropped are remembered."""
        vectors = list(self.embedder.embed([qa.question for qa in qas])) if self.embedder and qas else [None] * len(qas)
        verdicts = []
        for qa, vector in zip(qas, vectors):
            words = frozenset(content_words(qa.question))
            verdict = self._exact(qa) or self._near(qa, words, vector)
            if verdict is None:
                self._keep(qa, words, vector)
            verdicts.append(verdict)
        return verdicts

    def _prefix(self, words: frozenset) -> list[str]:
        ordered = sorted(words)
        return ordered[:len(ordered) - math.ceil(self.threshold * len(ordered)) + 1]

    def _keep(self, qa: QA, words: frozenset, vector):
        self.exact[normalise(qa.question)] = qa
        for word in self._prefix(words):
            self.by_prefix[word].append(len(self.kept))
        self.kept.append(qa)
        self.words.append(words)
        if vector is not None:
            self._store(len(self.kept) - 1, vector)

    def _store(self, row: int, vector):
        """The kept vector in its row; the matrix doubles when full, so that storing n of them costs O(n)."""
        if self.vectors is None or row == len(self.vectors):
            grown = np.zeros((max(64, 2 * row), len(vector)), dtype=np.float32)
            if self.vectors is not None:
                grown[:row] = self.vectors
            self.vectors = grown
        self.vectors[row] = vector

    def _exact(self, qa: QA) -> Optional[Verdict]:
        same = self.exact.get(normalise(qa.question))
        return Verdict(f"duplicate: exact, {self._where(same, qa)}", same.question) if same else None

    def _near(self, qa: QA, words: frozenset, vector) -> Optional[Verdict]:
        """The kept question most similar to this one, at `threshold` or more and with the same numbers (questions
        that differ in a number, "Llama 2" and "Llama 3", "Fact 0.1.0" and "Fact 0.2.0", ask about different
        things however alike they read; an embedding scores them 0.97)."""
        if self.embedder is not None:
            scores = self.vectors[:len(self.kept)] @ vector if self.vectors is not None else np.zeros(0)
            candidates = [(float(scores[i]), i) for i in np.flatnonzero(scores >= self.threshold)]
        else:
            near = {i for word in self._prefix(words) for i in self.by_prefix.get(word, ())}
            candidates = [(len(words & self.words[i]) / len(words | self.words[i]), i) for i in sorted(near)]
        numbers = numbers_of(qa.question)
        score, best = max(((s, i) for s, i in candidates if s >= self.threshold
                           and numbers_of(self.kept[i].question) == numbers), key=lambda c: (c[0], -c[1]),
                          default=(None, None))
        if best is None:
            return None
        kept = self.kept[best]
        return Verdict(f"duplicate: near, {self._where(kept, qa)}", f"{score:.2f}: {kept.question}")

    @staticmethod
    def _where(kept: QA, qa: QA) -> str:
        return "within its chunk" if kept.chunk_index == qa.chunk_index else "across the corpus"


# ---- the stage ---------------------------------------------------------------------------------------------------
GRADE = re.compile(r"\b([1-5])\b")


class QualityStage:
    """The filters over a whole run, window after window (duplicates are remembered across windows), and the data
    card's figures, gathered as it goes (memory grows with the kept questions' word sets, not their answers)."""

    def __init__(self, settings: dict, chunks: list[Chunk], client=None, grade_params: Optional[dict] = None):
        self.s, self.chunks, self.client, self.grade_params = settings, chunks, client, grade_params or {}
        self.duplicates = Duplicates(settings) if settings["duplicates"] else None
        self.retriever = build_retriever(chunks, settings["round_trip_retriever"], settings["embedding_model"],
                                         settings=SearchSettings()) if settings["round_trip"] else None
        self.card = CardFigures()

    def judge(self, qas: list[QA]) -> list[QA]:
        """The QAs with their verdict (dropped: None if kept) and oracle rank (None when not retrieved)."""
        ranks = self._ranks(qas)
        qas = [replace(qa, oracle_rank=rank) for qa, rank in zip(qas, ranks)]
        verdicts = [self._one_by_one(qa) for qa in qas]
        if self.duplicates is not None:
            fresh = [qa for qa, v in zip(qas, verdicts) if v is None]
            found = iter(self.duplicates.check(fresh))
            verdicts = [next(found) if v is None else v for v in verdicts]
        verdicts = [v or self._round_trip(qa) for qa, v in zip(qas, verdicts)]
        if self.s["teacher_grade"]:
            verdicts = self._grades(qas, verdicts)
        judged = [replace(qa, dropped=v) for qa, v in zip(qas, verdicts)]
        for qa in judged:
            self.card.add(qa, self.chunks[qa.chunk_index].source)
        return judged
    def _one_by_one(self, qa: QA) -> Optional[Verdict]:
        oracle = self.chunks[qa.chunk_index].text
        if self.s["answer_checks"]:
            problem = answer_problem(qa, oracle)
            if problem:
                return problem
        return question_problem(qa.question, self.s) if self.s["question_checks"] else None

    def _ranks(self, qas: list[QA]) -> list[Optional[int]]:
        if self.retriever is None or not qas:
            return [None] * len(qas)
        rankings = self.retriever.rank([qa.question for qa in qas], min(self.s["round_trip_k"], len(self.chunks)))
        return [ranking.index(qa.chunk_index) + 1 if qa.chunk_index in ranking else None
                for qa, ranking in zip(qas, rankings)]

    def _round_trip(self, qa: QA) -> Optional[Verdict]:
        if self.retriever is None:
            return None
        if qa.oracle_rank is None:
            return Verdict("round trip: oracle not retrieved", f"not in the top {self.s['round_trip_k']}")
        copied = copied_share(qa.question, self.chunks[qa.chunk_index].text)
        if qa.oracle_rank == 1 and copied >= self.s["copy_threshold"]:
            return Verdict("round trip: copied from the chunk", round(copied, 2))
        return None

    def _grades(self, qas: list[QA], verdicts: list) -> list:
        """The teacher's grade (1-5) of each question still kept; below teacher_grade_threshold it is dropped. A
        reply without a grade keeps the question (the grade says nothing)."""
        asked = [i for i, v in enumerate(verdicts) if v is None]
        requests = [(fill_prompt(self.s["teacher_grade_prompt"], context=self.chunks[qas[i].chunk_index].text,
                                 question=qas[i].question, answer=qas[i].cot_answer), self.grade_params)
                    for i in asked]
        for i, result in zip(asked, self.client.complete_all(requests, "grades")):
            grade = GRADE.search(result.text or "")
            if grade and int(grade.group(1)) < self.s["teacher_grade_threshold"]:
                verdicts[i] = Verdict("grade: below the threshold", int(grade.group(1)))
        return verdicts


# ---- the data card -----------------------------------------------------------------------------------------------
DATA_CARD = "data_card.md"
LENGTH_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, 20), (21, 30), (31, 60), (61, 10_000))
EXAMPLES = 3                   # kept examples shown, and dropped ones per filter


@dataclass
class CardFigures:
    """What the data card counts, gathered question by question."""
    verdicts: collections.Counter = field(default_factory=collections.Counter)     # filter (or "kept") -> questions
    lengths: collections.Counter = field(default_factory=collections.Counter)      # words bucket -> kept questions
    kinds: collections.Counter = field(default_factory=collections.Counter)
    sources: collections.Counter = field(default_factory=collections.Counter)
    per_chunk: collections.Counter = field(default_factory=collections.Counter)    # chunk index -> kept questions
    ranks: collections.Counter = field(default_factory=collections.Counter)        # rank (or None) -> questions
    kept_ranks: collections.Counter = field(default_factory=collections.Counter)
    kept_examples: list = field(default_factory=list)
    dropped_examples: dict = field(default_factory=dict)                           # filter -> examples

    def add(self, qa: QA, source: str):
        self.ranks[qa.oracle_rank] += 1
        if qa.dropped:
            self.verdicts[qa.dropped.filter] += 1
            examples = self.dropped_examples.setdefault(qa.dropped.filter, [])
            if len(examples) < EXAMPLES:
                examples.append((qa.question, qa.dropped.value))
            return
        self.verdicts["kept"] += 1
        words = len(qa.question.split())
        self.lengths[next(b for b in LENGTH_BUCKETS if b[0] <= words <= b[1])] += 1
        self.kinds[question_kind(qa.question)] += 1
        self.sources[source] += 1
        self.per_chunk[qa.chunk_index] += 1
        self.kept_ranks[qa.oracle_rank] += 1
        if len(self.kept_examples) < EXAMPLES:
            self.kept_examples.append((qa.question, final_answer(qa.cot_answer) or ""))


def _table(header: tuple, rows) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
            *(f"| {' | '.join(str(cell) for cell in row)} |" for row in rows)]


def _share(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.0f}%)" if total else str(count)


def data_card(card: CardFigures, stages: list[tuple[str, object]], settings: dict, chunks_asked: int) -> str:
    """The markdown of data_card.md: what the data is, stage by stage, and what was kept."""
    kept = card.verdicts["kept"]
    questions = sum(card.verdicts.values())
    chunk_load = collections.Counter(min(card.per_chunk.get(i, 0), 4) for i in range(chunks_asked))
    lines = ["# Data card", "",
             "What this RAFT dataset holds, how it was made, and what was left out (written by raft.py's quality "
             "stage, quality.py).", "", "## Counts at each stage", "", *_table(("stage", "count"), stages), "",
             "## What the filters dropped (questions, with every record made from them)", "",
             *_table(("filter", "questions"), [(name, _share(n, questions)) for name, n in card.verdicts.most_common()
                                               if name != "kept"] or [("(none)", 0)]), "",
             f"Kept: {_share(kept, questions)} of {questions} questions. Each dropped record is in "
             "`filtered_out.jsonl` with its filter and the value that dropped it.", "",
             "## The kept questions", "",
             *_table(("length in words", "questions"),
                     [(f"{low}-{high}" if high < 10_000 else f"{low}+", _share(card.lengths[(low, high)], kept))
                      for low, high in LENGTH_BUCKETS if card.lengths[(low, high)]]), "",
             *_table(("kind", "questions"), [(kind, _share(n, kept)) for kind, n in card.kinds.most_common()]), "",
             *_table(("source file", "questions"), [(f"`{s}`", _share(n, kept)) for s, n in card.sources.most_common()]),
             "",
             *_table(("questions per chunk asked about", "chunks"),
                     [("4 or more" if n == 4 else n, _share(chunk_load[n], chunks_asked)) for n in sorted(chunk_load)]),
             "", "## The oracle chunk's rank when the question is searched (the round trip)", "",
             *_table(("rank", "all questions", "kept"),
                     [(rank if rank is not None else "not retrieved / not searched", card.ranks[rank],
                       card.kept_ranks[rank]) for rank in sorted(card.ranks, key=lambda r: (r is None, r or 0))]), "",
             "## Examples", "", "Kept:", "",
             *(f"- {q} → {a}" for q, a in card.kept_examples), "", "Dropped:", "",
             *(f"- **{name}**: {q} ({value})" for name, examples in card.dropped_examples.items()
               for q, value in examples), "",
             "## Settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


# ---- alone, on a finished output folder ---------------------------------------------------------------------------
WINDOW = 2000          # questions judged at a time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, help="a finished raft.py output folder (its dataset is filtered)")
    p.add_argument("-c", "--config", default="raft.yaml", help="settings whose quality section is applied")
    p.add_argument("-u", "--url", action="append", help="the teacher, only for teacher_grade")
    p.add_argument("-m", "--model", help="the teacher's model name, for teacher_grade")
    add_client_flags(p)
    return p.parse_args(argv)


def questions_of(records: list[dict], position: dict[str, int]) -> list[tuple[QA, list[dict]]]:
    """The dataset's records grouped by question (an example and its refusal example share the question and the
    oracle), in record order; a record whose oracle is not among the run's chunks is an InputError."""
    grouped: dict[tuple, tuple[QA, list[dict]]] = {}
    for record in records:
        key = (record["question"], record["oracle_context"])
        if key not in grouped:
            if record["oracle_context"] not in position:
                raise InputError(f"a record's oracle chunk is not among the chunks of the run's documents (record "
                                 f"{record['id']}): are the documents where the run read them, chunked alike?")
            grouped[key] = (QA(position[record["oracle_context"]], record["question"], record["cot_answer"],
                               bool(record.get("quotes_verified"))), [])
        if str(record["id"]).startswith("seed_task"):
            grouped[key] = (replace(grouped[key][0], cot_answer=record["cot_answer"]), grouped[key][1])
        grouped[key][1].append(record)
    return list(grouped.values())


def run(args) -> int:
    output = Path(args.output)
    run_record = output / RUN_RECORD
    try:
        generation = json.loads(run_record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{run_record} cannot be read ({type(e).__name__}): -o must be a finished raft.py output "
                         "folder") from None
    settings = load_config(args.config, RAFT_SCHEMA)["quality"]
    cfg = generation["config"]
    _, chunks, _ = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"], cfg["chunk_size"])
    grouped = questions_of(formats.read(str(output), "arrow"), {c.text: i for i, c in enumerate(chunks)})
    client = None
    if settings["teacher_grade"]:
        client = client_from_config(cfg, args, args.url or [], args.model or cfg["model"],
                                    cfg["cache_path"] or str(output / "llm_cache.sqlite"))
        connect(client, args)
        client.identify_model()
    stage = QualityStage(settings, chunks, client, {"temperature": cfg["temperature"],
                                                    "max_tokens": settings["teacher_grade_max_tokens"]})
    judged = [qa for start in range(0, len(grouped), WINDOW)
              for qa in stage.judge([qa for qa, _ in grouped[start:start + WINDOW]])]
    with FolderLock(output):
        counts = rewrite(output, cfg, [(qa, records) for qa, (_, records) in zip(judged, grouped)])
        stages = [("records read", sum(len(r) for _, r in grouped)), ("questions", len(grouped)),
                  ("questions kept", stage.card.verdicts["kept"]), ("records written", counts["kept"]),
                  ("records filtered out", counts["filtered"])]
        staging = output / STAGING
        (staging / DATA_CARD).write_text(data_card(stage.card, stages, {"quality": settings, "seed": cfg["seed"]},
                                                   len({qa.chunk_index for qa, _ in grouped})), encoding="utf-8")
        generation["counts"]["quality (quality.py)"] = dict(stage.card.verdicts)
        (staging / RUN_RECORD).write_text(json.dumps(generation, indent=2, ensure_ascii=False) + "\n")
        swap_in(staging, output)
    print("\n".join([f"questions {len(grouped)}: {stage.card.verdicts['kept']} kept",
                     *(f"  filtered {n} {name}" for name, n in stage.card.verdicts.most_common() if name != "kept"),
                     f"records {counts['kept']} kept, {counts['filtered']} in {output / FILTERED}",
                     f"data card {output / DATA_CARD}"]))
    return 0


def rewrite(output: Path, cfg: dict, judged: list[tuple[QA, list[dict]]]) -> collections.Counter:
    """The kept records (with their oracle rank) into a fresh staging folder: the dataset, the converted file and
    filtered_out.jsonl."""
    staging = output / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    sink, counts = formats.RecordSink(staging / STREAM, staging), collections.Counter()
    with open(staging / FILTERED, "wb") as filtered:
        for qa, records in judged:
            for record in records:
                record = {**record, "oracle_rank": qa.oracle_rank}
                if qa.dropped:
                    filtered.write(filtered_line(record, qa.dropped))
                    counts["filtered"] += 1
                else:
                    sink.add(record)
                    counts["kept"] += 1
    sink.close()
    convert_stream(staging, cfg)
    return counts


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
