"""Scoring answers: ROUGE, exact match, the judge's verdict, refusals, precision, and answer support of a retrieval.

Used by raft_eval.py for the metrics and by chat.py to notice a refusal. Every function is pure and small, so each
is unit-tested against hand-computed values (tests/test_metrics.py).
"""
import re
import string
from typing import Optional, Sequence

from rouge_score import rouge_scorer

from raft_utils import content_words, final_answer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SUPPORT_THRESHOLD = 0.5      # "most" of the gold answer's content words must appear in the retrieved text

_scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def answer_text(reply: str) -> str:
    """What a reply answers: the text after <ANSWER>: when the model wrote one, else the whole reply
    (a base model does not use the RAFT format)."""
    return final_answer(reply) or (reply or "").strip()


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures with Porter stemming (what evaluate's 'rouge' computes, without the hub)."""
    scores = _scorer.score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return squad_normalise(prediction) == squad_normalise(reference)


_VERDICT = re.compile(r"\b(yes|no)\b", re.I)
_WRONG = re.compile(r"\b(?:incorrect|not correct|wrong)\b", re.I)
_RIGHT = re.compile(r"\bcorrect\b", re.I)


def parse_verdict(reply: str) -> Optional[bool]:
    """The judge's YES (True) or NO (False). The first word decides when it is a verdict ("Yes.", "**NO**");
    otherwise every yes/no word in the reply must agree; a reply without one may still say it plainly ("The
    answer is correct" / "... is wrong"). Anything else, or both, is None: counted as unparseable, never guessed."""
    words = (reply or "").replace("*", " ").replace("`", " ").strip()
    first = re.match(r"\W*(yes|no)\b", words, re.I)
    if first:
        return first.group(1).lower() == "yes"
    found = {m.lower() for m in _VERDICT.findall(words)}
    if found:
        return found == {"yes"} if len(found) == 1 else None
    wrong, right = bool(_WRONG.search(words)), bool(_RIGHT.search(_WRONG.sub(" ", words)))
    return right if wrong != right else None


_REFUSAL_FORMS = re.compile(
    r"\bi (?:do not|don't|dont|cannot|can't|can not) (?:know|answer|tell|say)\b"
    r"|\b(?:no|not enough) (?:relevant )?information\b"
    r"|\b(?:documents?|context|passages?) (?:do|does|did) not (?:contain|mention|provide|include|say)\b"
    r"|\b(?:documents?|context|passages?) (?:don't|doesn't|didn't) (?:contain|mention|provide|include|say)\b"
    r"|\b(?:unable|not able) to (?:answer|find|determine)\b"
    r"|\bi(?: am|'m) not sure\b"
    r"|^\W*unknown\W*$", re.I)


def is_refusal(answer: str, refusal_answer: str = "") -> bool:
    """True when an answer declines: raft.yaml's refusal answer (what the student was trained to say) or a plain
    "I don't know" form. Pass the answer part (answer_text), not the reasoning: reasoning often says that some
    document does not contain the answer on its way to one that does."""
    text = " ".join(answer.split())
    if not text:
        return False
    if refusal_answer and " ".join(refusal_answer.split()).lower() in text.lower():
        return True
    return bool(_REFUSAL_FORMS.search(text.replace("’", "'")))


def precision(judge_score: float, refusal_rate: float) -> Optional[float]:
    """judge_score / (1 - refusal_rate): how often the answers a system dares to give are right.
    None when it refused everything."""
    return judge_score / (1 - refusal_rate) if refusal_rate < 1 else None


def answer_supported(retrieved_text: str, gold_answer: str, threshold: float = SUPPORT_THRESHOLD) -> Optional[bool]:
    """Whether the retrieved text contains most (more than `threshold`) of the gold answer's content words:
    a retrieval check that needs no LLM. None for an answer without content words (e.g. 'Yes')."""
    wanted = set(content_words(gold_answer))
    if not wanted:
        return None
    present = set(content_words(retrieved_text))
    return len(wanted & present) / len(wanted) > threshold


def support_recall(rankings: Sequence[Sequence[int]], chunks: Sequence, gold_answers: Sequence[str],
                   k: int) -> Optional[float]:
    """Answer-support recall@k: the share of questions whose top-k chunks (rankings: chunk indices, best first,
    one list per question) support the gold answer. Answers without content words (such as 'Yes') are left out;
    None when no answer is left."""
    supported = [answer_supported(" ".join(chunks[i].text for i in ranking[:k]), gold)
                 for ranking, gold in zip(rankings, gold_answers)]
    judged = [s for s in supported if s is not None]
    return sum(judged) / len(judged) if judged else None


def mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarise(rows: Sequence[dict]) -> dict:
    """The metrics of one system under one condition, from its per-question rows (keys: rouge1, rouge2, rougeL,
    exact_match, verdict (True/False/None), refusal, failed)."""
    total = len(rows)
    yes = sum(r["verdict"] is True for r in rows)
    refusals = sum(r["refusal"] for r in rows)
    judge_score = yes / total if total else 0.0
    refusal_rate = refusals / total if total else 0.0
    return {
        "questions": total,
        **{name: mean([r[name] for r in rows]) for name in ROUGE_TYPES},
        "exact_match": mean([float(r["exact_match"]) for r in rows]),
        "judge_score": judge_score,
        "judge_yes": yes,
        "judge_unparseable": sum(r["verdict"] is None and not r["failed"] for r in rows),
        "refusals": refusals,
        "refusal_rate": refusal_rate,
        "precision": precision(judge_score, refusal_rate),
        "failed_requests": sum(r["failed"] for r in rows),
    }
