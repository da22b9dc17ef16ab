"""RAFT records: the teacher's replies parsed (questions, quoted answers) and assembled into records with their
oracle and distractor chunks (design.md, section 2).

Used by raft.py (generation); the record format is read back by format.py and finetune/raft_dataset.py.
"""
import random
import re
from dataclasses import dataclass
from typing import Optional

from documents import Chunk
from text import normalise, quote_spans

# ============================================================================ parse

_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\(?\d{1,3}[.)\]:]|q\d{1,3}[.):]|question\s*\d{0,3}\s*[.):])\s*", re.I)
_QUOTES = "\"'“”‘’`"
_ASKING = re.compile(r"^(what|which|who|whom|whose|when|where|why|how|is|are|was|were|can|could|does|do|did|"
                     r"should|will|would|may|explain|describe|list|name|give|compare)\b", re.I)
_SELF_REFERENCE = re.compile(r"\bthis (document|passage|text|context|chunk|excerpt)\b|"
                             r"\b(according to|in|from|based on) the (document|passage|text|context|excerpt)\b", re.I)


def parse_questions(reply: str) -> list[str]:
    """Questions from a teacher reply, loosely: numbering, bullets, bold and quotes stripped; several questions
    on one line split apart; lines that neither end in '?' nor start like a question or a request dropped
    (headers such as 'Here are 4 questions:', summaries of the chunk); questions that point at 'the document'
    dropped, since the user who asks them later has no document in front of them."""
    questions = []
    for line in reply.splitlines():
        for piece in re.split(r"(?<=\?)\s+", line.strip()):
            piece = _LIST_MARKER.sub("", piece.replace("**", "")).strip().strip(_QUOTES).strip()
            if len(piece) >= 8 and (piece.endswith("?") or _ASKING.match(piece)) and not piece.endswith(":") \
                    and not _SELF_REFERENCE.search(piece):
                questions.append(piece)
    return questions


def quotes_verified(cot_answer: str, oracle: str) -> bool:
    """True when the answer quotes the oracle at least once and every quote is found in it
    (whitespace- and case-insensitive). An unclosed ##begin_quote## counts as unverified."""
    spans = quote_spans(cot_answer)
    if not spans:
        return False
    haystack = normalise(oracle)
    return all(normalise(s).strip(_QUOTES + " .…") in haystack for s in spans)

# ============================================================================ assemble


@dataclass(frozen=True)
class QA:
    chunk_index: int
    question: str
    cot_answer: str
    quotes_verified: bool
    oracle_rank: Optional[int] = None      # the oracle chunk's rank when the question is searched (quality.py)
    dropped: Optional[object] = None       # quality.Verdict when a filter dropped the question, else None


@dataclass(frozen=True)
class AssemblySettings:
    num_distract_docs: int
    oracle_probability: float
    refusal_probability: float
    refusal_answer: str


def chunks_needed(s: AssemblySettings) -> int:
    """The oracle, its distractors, and one more when an oracle may be replaced or a refusal example
    (distractors only) may be drawn."""
    spare = 1 if s.oracle_probability < 1 or s.refusal_probability > 0 else 0
    return 1 + s.num_distract_docs + spare


def instruction(docs: list[str], question: str) -> str:
    """The documents and the question in the RAFT record's form: what the student sees in training, in the
    evaluation's RAG answers and in chat."""
    return "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + question


def _record(row: int, prefix: str, question: str, docs: list[str], oracle: Chunk, answer: str,
            oracle_present: bool, verified: Optional[bool], oracle_rank: Optional[int]) -> dict:
    return {
        "id": f"{prefix}_{row}",
        "type": "general",
        "question": question,
        "context": {"title": [["placeholder_title"] * len(docs)], "sentences": [docs]},
        "oracle_context": oracle.text,
        "cot_answer": answer,
        "instruction": instruction(docs, question),
        "source": oracle.source,
        "oracle_present": oracle_present,
        "quotes_verified": verified,
        "oracle_rank": oracle_rank,
    }


class Assembler:
    """RAFT records, in the order of the QAs it is given, window after window: one seeded generator and one row
    counter for the whole run, so any split into windows gives the same records as a single window. Each
    question costs O(num_distract_docs) draws, whatever the number of chunks."""

    def __init__(self, chunks: list[Chunk], settings: AssemblySettings, seed: int):
        self.chunks, self.s = chunks, settings
        self.rng = random.Random(seed)
        self.rows = 0

    def _others(self, oracle: int, count: int) -> list[int]:
        """`count` distinct chunk indices other than the oracle's (drawn among n - 1, the oracle skipped over)."""
        drawn = self.rng.sample(range(len(self.chunks) - 1), count)
        return [i + 1 if i >= oracle else i for i in drawn]

    def _record(self, prefix: str, *fields) -> dict:
        record = _record(self.rows, prefix, *fields)
        self.rows += 1
        return record

    def records(self, qas: list[QA]) -> list[dict]:
        return [record for _, records in self.records_by_qa(qas) for record in records]

    def records_by_qa(self, qas: list[QA]) -> list[tuple[QA, list[dict]]]:
        """Each QA with its records (the example, and a refusal example when one is drawn). A dropped QA gets its
        records too, so that the random draws, and so every other record, do not depend on what was dropped."""
        s, chunks, rng = self.s, self.chunks, self.rng
        out = []
        for qa in qas:
            made = []
            oracle = chunks[qa.chunk_index]
            available = len(chunks) - 1
            # One extra distinct distractor stands by to take the oracle's place.
            drawn = self._others(qa.chunk_index, s.num_distract_docs + (1 if available > s.num_distract_docs else 0))
            docs = [oracle.text] + [chunks[i].text for i in drawn[:s.num_distract_docs]]
            rng.shuffle(docs)
            oracle_present = rng.random() < s.oracle_probability
            if not oracle_present:
                docs[docs.index(oracle.text)] = chunks[drawn[-1]].text
            made.append(self._record("seed_task", qa.question, docs, oracle, qa.cot_answer, oracle_present,
                                     qa.quotes_verified, qa.oracle_rank))
            if rng.random() < s.refusal_probability:
                refusal_docs = [chunks[i].text for i in self._others(qa.chunk_index, s.num_distract_docs + 1)]
                made.append(self._record("refusal_task", qa.question, refusal_docs, oracle, s.refusal_answer,
                                         False, None, qa.oracle_rank))
            out.append((qa, made))
        return out


def assemble(qas: list[QA], chunks: list[Chunk], s: AssemblySettings, seed: int) -> list[dict]:
    """RAFT records of a list of QAs in one go (see Assembler)."""
    return Assembler(chunks, s, seed).records(qas)
