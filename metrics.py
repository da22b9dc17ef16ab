"""Scoring answers: exact match, token F1, ROUGE, quote support, groundedness from the judge's claims, the judge's
verdict, precision, answer support of a retrieval, and how far each number can be trusted: Wilson and bootstrap
intervals, paired comparisons (McNemar) with Holm's adjustment.

Used by raft_eval.py for the metrics, by calibration.py and by the chatbot (quote support). Every function is pure
and small, so each is unit-tested against hand-computed values (tests/test_metrics.py). Refusals: refusal.py.
"""
import collections
import math
import re
import string
from typing import Optional, Sequence

import numpy as np

from rouge_score import rouge_scorer

from text import content_words, final_answer, quote_spans

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
QUOTE_MARKS = "\"'“”‘’`"
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


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of the shares of the prediction's and the reference's normalised tokens
    that the other has (counted with repeats). Two empty answers agree (1.0); one empty one does not (0.0)."""
    predicted, wanted = squad_normalise(prediction).split(), squad_normalise(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision_share, recall_share = common / len(predicted), common / len(wanted)
    return 2 * precision_share * recall_share / (precision_share + recall_share)


def quote_support(reply: str, given: Sequence[str]) -> Optional[float]:
    """The share of the reply's ##begin_quote## spans found word for word in the chunks it was given (white space
    folded, whole words only; quote marks, full stops and an ellipsis around a span ignored). None for a reply with no readable quote
    (none, or one left unclosed): such replies are counted apart, neither supported nor not."""
    spans = [" ".join(s.split()).strip(QUOTE_MARKS + " .…") for s in (quote_spans(reply) or [])]
    spans = [s for s in spans if s]
    if not spans:
        return None
    haystack = " ".join(" ".join(given).split())
    return sum(bool(re.search(rf"(?<!\w){re.escape(span)}(?!\w)", haystack)) for span in spans) / len(spans)


_CLAIM_LINE = re.compile(r"^[\W\d_]*(supported|unsupported|not supported)\W*[:\-–]\s*(.+?)\s*$", re.I)


def parse_claims(reply: str) -> list[dict]:
    """The judge's groundedness reply, one claim a line ("SUPPORTED: ..." or "UNSUPPORTED: ..."; bullets, bold and
    numbering around the verdict are ignored): [{"claim", "supported"}]. Lines of any other form are skipped, so
    "NONE" (no claim) and a reply that follows no form both give no claims."""
    claims = []
    for line in (reply or "").splitlines():
        match = _CLAIM_LINE.match(line.replace("*", ""))
        if match:
            claims.append({"claim": match.group(2), "supported": match.group(1).lower() == "supported"})
    return claims


def groundedness(claims: Sequence[dict]) -> Optional[float]:
    """Supported claims / claims (RAGAS' faithfulness, TruLens' groundedness); None for an answer without claims."""
    return sum(c["supported"] for c in claims) / len(claims) if claims else None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for several comparisons reported together: the family-wise error
    stays at the level of one test. Adjusted values are in the input's order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# Words that decide a verdict, longest forms first so that "not correct" is not read as "correct".
_DECISIVE = re.compile(r"\b(not (?:incorrect|wrong)|not correct|incorrect|correct|wrong|yes|no)\b", re.I)
_MEANS_YES = {"yes", "correct", "not incorrect", "not wrong"}


def parse_verdict(reply: str) -> Optional[bool]:
    """The judge's YES (True) or NO (False): the first decisive word of the reply decides ("Yes.", "**NO**",
    "The answer is correct; there is no contradiction" is YES, "It is not correct" is NO). A reply without one is
    None: counted as unparseable, never guessed."""
    words = " ".join((reply or "").replace("*", " ").replace("`", " ").split())
    first = _DECISIVE.search(words)
    return None if first is None else first.group(1).lower() in _MEANS_YES


def precision(rows: Sequence[dict]) -> Optional[float]:
    """How often the answers a system dares to give are right: YES verdicts among the answers that are not
    refusals and have a verdict (a failed request or an unparseable verdict says nothing either way). The
    tutorial's judge_score / (1 - refusal_rate) when every answer was judged; never above 1. None when nothing
    is left."""
    dared = [r for r in rows if not r["refusal"] and not r["failed"] and r["verdict"] is not None]
    return sum(r["verdict"] for r in dared) / len(dared) if dared else None


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


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None; None when none is left."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# Per-answer metrics that some answers do not have (None: a failed request, no quote, no claim, no documents): the
# mean is over the answers that have one, and how many had one is reported beside it.
PARTIAL_METRICS = {"similarity": "answers_compared", "quote_support": "answers_with_quotes",
                   "groundedness": "answers_with_claims"}


def summarise(rows: Sequence[dict]) -> dict:
    """The metrics of one system under one condition, from its per-question rows (keys: rouge1, rouge2, rougeL,
    exact_match, verdict (True/False/None), refusal, failed)."""
    total = len(rows)
    yes = sum(r["verdict"] is True for r in rows)
    refusals = sum(r["refusal"] for r in rows)
    return {
        "questions": total,
        **{name: mean([r[name] for r in rows]) for name in ROUGE_TYPES},
        "exact_match": mean([float(r["exact_match"]) for r in rows]),
        "judge_score": yes / total if total else 0.0,
        "judge_yes": yes,
        "judge_unparseable": sum(r["verdict"] is None and not r["failed"] for r in rows),
        "refusals": refusals,
        "refusal_rate": refusals / total if total else 0.0,
        "precision": precision(rows),
        "failed_requests": sum(r["failed"] for r in rows),
        "truncated": sum(bool(r.get("truncated")) for r in rows),
        "token_f1": mean([r.get("token_f1") for r in rows]),
        **{name: mean([r.get(name) for r in rows]) for name in PARTIAL_METRICS},
        **{count: sum(r.get(name) is not None for r in rows) for name, count in PARTIAL_METRICS.items()},
    }


# ---- how far a number can be trusted -----------------------------------------------------------------------------
Z95 = 1.959964          # two-sided 95%
Z80_POWER = 0.841621    # one-sided, 80% power


def wilson_interval(successes: int, n: int, z: float = Z95) -> Optional[tuple[float, float]]:
    """The Wilson score interval of a proportion: sound at small n and at 0 or n successes (unlike p +/- z SE)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# The metrics that get an interval: each is a function of per-question arrays (see question_arrays).
INTERVAL_METRICS = ("judge_score", "refusal_rate", "precision", "exact_match", "rougeL", "token_f1", "similarity",
                    "quote_support", "groundedness")
AVERAGED = ("exact_match", "rougeL", "token_f1", "similarity", "quote_support", "groundedness")   # NaN: not had


def question_arrays(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per-question values of one system under one condition, as arrays to resample."""
    return {"yes": np.array([r["verdict"] is True for r in rows], dtype=float),
            "refusal": np.array([bool(r["refusal"]) for r in rows], dtype=float),
            "dared": np.array([not r["refusal"] and not r["failed"] and r["verdict"] is not None for r in rows],
                              dtype=float),
            **{name: np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows]) for name in AVERAGED}}


def _metric_samples(arrays: dict[str, np.ndarray], resamples: np.ndarray) -> dict[str, np.ndarray]:
    """Each interval metric on every resample (rows of question indices); precision is NaN where none dared."""
    pick = {name: values[resamples] for name, values in arrays.items()}
    dared = pick["dared"].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_values = (pick["yes"] * pick["dared"]).sum(axis=1) / dared
        averaged = {name: _nanmean_rows(pick[name]) for name in AVERAGED}
    return {"judge_score": pick["yes"].mean(axis=1), "refusal_rate": pick["refusal"].mean(axis=1),
            "precision": precision_values, **averaged}


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """The mean of each row over its values that are not NaN; NaN for a row with none (no warning)."""
    present = ~np.isnan(values)
    return np.where(present, values, 0.0).sum(axis=1) / present.sum(axis=1)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` bootstrap draws of n question indices with replacement, seeded (the same draws serve every
    system, which is what makes a comparison paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_interval(samples: np.ndarray) -> Optional[list[float]]:
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_intervals(rows: Sequence[dict], resamples: np.ndarray) -> dict[str, Optional[list[float]]]:
    """The 95% percentile-bootstrap interval of each interval metric, over the questions."""
    samples = _metric_samples(question_arrays(rows), resamples)
    return {name: _percentile_interval(samples[name]) for name in INTERVAL_METRICS}


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: b questions right only for the first system, c only for the second. Under
    'no difference' each of the b + c discordant questions goes either way with probability 1/2."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def questions_needed(difference: float, discordant: float) -> Optional[int]:
    """Questions a paired comparison needs to detect `difference` (a share) at 5% two-sided with 80% power,
    given the share of questions on which the two systems disagree (Connor 1987, McNemar's test). None when
    there is no difference to detect."""
    d = abs(difference)
    if d == 0 or discordant <= 0:
        return None
    discordant = max(discordant, d)             # at least the difference itself must be discordant
    root = Z95 * math.sqrt(discordant) + Z80_POWER * math.sqrt(max(discordant - d * d, 0.0))
    return math.ceil(root * root / (d * d))


def paired_comparison(first: Sequence[dict], second: Sequence[dict], resamples: np.ndarray,
                      metric: str = "yes") -> dict:
    """The first system against the second on the same questions: the difference (first - second) of a right-or-
    wrong metric (the judge's YES by default, or exact_match) with its paired-bootstrap 95% interval, the exact
    McNemar p-value, and the questions a difference of this size would need to be detected."""
    yes_a, yes_b = question_arrays(first)[metric], question_arrays(second)[metric]
    n = len(yes_a)
    b = int(((yes_a == 1) & (yes_b == 0)).sum())
    c = int(((yes_a == 0) & (yes_b == 1)).sum())
    differences = (yes_a - yes_b)[resamples].mean(axis=1)
    difference = (b - c) / n if n else 0.0
    p = mcnemar_exact_p(b, c)
    return {"questions": n, "difference": difference, "interval": _percentile_interval(differences),
            "only_first_right": b, "only_second_right": c, "mcnemar_p": p, "significant": p < 0.05,
            "questions_needed": questions_needed(difference, (b + c) / n if n else 0.0)}
