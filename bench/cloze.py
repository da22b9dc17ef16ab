"""Questions with known answers, cut from the documents without an LLM, for bench/raft_effect.py.

A question is one sentence of a chunk with its most distinctive term blanked out ("Fill in the blank: ..."); the
gold answer is that term, and the chain-of-thought answer quotes the sentence, so every training answer quotes its
oracle chunk exactly and every test answer can be scored by exact match. Why not the teacher: the 135M teacher's
questions are loose (the quality filters drop many, and what is left is often vague), and a loose question has no
exact answer to score. What this gives up: a blanked sentence shares most of its words with its chunk, so the
retriever finds it easily; the test is whether a model reads the right document among distractors and copies from
it, not whether retrieval finds the document.
"""
import collections
import random
import re
from dataclasses import dataclass

from finetune.pairs import sentences
from metrics import squad_normalise
from raft_utils import QA

BLANK = "____"
MAX_SENTENCE_WORDS = 40
MAX_TERM_WORDS = 4
# A term worth asking for: a number (with its unit), a run of capitalised words not at the sentence's start, or a
# code-like token (--flag, snake_case, dotted.name, CamelCase, a word with digits).
_NUMBER = r"\d[\d.,:%]*(?:\s?(?:[KMGT]B|ms|s|GB|MB|B|k|M|tokens?|GPUs?|%))?"
_NAME = r"(?:[A-Z][\w.+-]*)(?:\s+[A-Z][\w.+-]*){0,3}"
_CODE = r"--[\w-]+|\w+_\w+|\w+\.\w+\w*|[a-z]+[A-Z]\w*|[A-Za-z]+\d[\w.-]*"
_TERM = re.compile(rf"(?<![\w-])(?:{_CODE}|{_NUMBER}|{_NAME})(?![\w])")


@dataclass(frozen=True)
class Cloze:
    chunk_index: int
    sentence: str
    term: str

    @property
    def question(self) -> str:
        return f'Fill in the blank: "{self.sentence.replace(self.term, BLANK, 1)}"'

    @property
    def cot_answer(self) -> str:
        return (f"The blank is in this sentence of the documents: ##begin_quote##{self.sentence}##end_quote## "
                f'There it reads "{self.term}".\n<ANSWER>: {self.term}')

    def qa(self, chunk_index: int) -> QA:
        return QA(chunk_index, self.question, self.cot_answer, quotes_verified=True)


def whole_sentences(text: str) -> list[str]:
    """The chunk's sentences that are whole (a capital first, a full stop, question or exclamation mark last: a
    chunk's edges cut sentences), on one line (a heading glued to a sentence is not one) and of a usable length."""
    return [s for s in sentences(text) if s[0].isupper() and s[-1] in ".!?" and "\n" not in s
            and len(s.split()) <= MAX_SENTENCE_WORDS]


def terms(sentence: str) -> list[str]:
    """Candidate terms of a sentence, in order: not its first word, two characters or more, at most MAX_TERM_WORDS
    words, found once, and not a word exact match throws away (a capitalised "An")."""
    found = []
    for match in _TERM.finditer(sentence):
        term = match.group(0).strip(" .,:;")
        if match.start() == 0 or len(term) < 2 or len(term.split()) > MAX_TERM_WORDS or not squad_normalise(term):
            continue
        if sentence.count(term) == 1 and term not in found:
            found.append(term)
    return found


def rarity(chunks: list[str]) -> collections.Counter:
    """How many chunks each term appears in: a term rare in the corpus is one only its own chunk can supply."""
    seen = collections.Counter()
    for text in chunks:
        seen.update({term for sentence in whole_sentences(text) for term in terms(sentence)})
    return seen


def blanks(chunks: list[str], indices: list[int], per_chunk: int, seed: int) -> list[Cloze]:
    """Up to `per_chunk` questions from each chunk of `indices`, each a whole sentence with one term blanked: every
    sentence's rarest term first, then its second rarest (a second question about the same sentence) and so on;
    among equals, the rarer term first, ties broken by a seeded shuffle."""
    rng, seen = random.Random(seed), rarity(chunks)
    out = []
    for index in indices:
        candidates = []
        for sentence in whole_sentences(chunks[index]):
            for place, term in enumerate(sorted(terms(sentence), key=lambda t: (seen[t], -len(t)))):
                candidates.append((place, seen[term], rng.random(), Cloze(index, sentence, term)))
        out += [cloze for *_, cloze in sorted(candidates)[:per_chunk]]
    return out
