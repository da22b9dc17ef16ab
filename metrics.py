"""Scoring answers: ROUGE, exact match, the judge's verdict, refusals, precision, answer support of a retrieval,
and how far each number can be trusted: Wilson and bootstrap intervals, paired comparisons (McNemar).

Used by raft_eval.py for the metrics and by chat.py to notice a refusal. Every function is pure and small, so each
is unit-tested against hand-computed values (tests/test_metrics.py).
"""
import collections
import math
import random
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


# A refusal is an answer whose first sentence declines: the speaker cannot answer, or the sources do not say it.
# Only the first sentence counts (after a lead-in such as "Sorry," or "According to the documents," or "Regarding
# X,", and after sentences that only apologise or restate the question), so that "Llama Guard stores no information
# about the user" or "The licence does not contain a patent grant" (statements about the subject) are answers; and a
# decline followed by "but", "however", ";" or a dash and an answer of three words or more is an answer. Measured on
# three labelled sets in tests/fixtures (tests/test_metrics.py), two of them written apart from these rules.
_DOC_NOUN = (r"(?:documents?|docs|documentation|context(?! (?:window|length|size))|passages?|texts?|sources?|"
             r"materials?|excerpts?|sections?|pages?|articles?|handbook|manuals?|guides?|knowledge base|"
             r"references?|api reference|faqs?|wiki|records|notes|files|corpus|search results|information|info|"
             r"templates?|library)")
_QUALIFIER = (r"(?: (?:that )?(?:i|we) (?:have|was given|were given|retrieved|can see|have access to)| available to "
              r"(?:me|us)| provided| given| above| retrieved)")
# What the bot answers from: a document noun, anything "provided" or that "I have", or the bot's own ("our FAQ").
_SOURCE = (rf"(?:(?:(?:the|these|this|those|any|its|all of the|all the) )?(?:[\w-]+ ){{0,2}}?{_DOC_NOUN}"
           rf"{_QUALIFIER}?|(?:the|these|this|those) (?:[\w-]+ ){{0,2}}?[\w-]+{_QUALIFIER}|(?:my|our) (?:[\w-]+ )"
           r"{0,2}?[\w-]+|what (?:i|we) (?:was|were|have been) given|what (?:i|we) have)")
_TELL = (r"(?:say|mention|contain|cover|discuss|address|state|include|answer|talk about|describe|specify|provide|"
         r"give|tell|list|explain|go into|document|have|show)")
_SAID = (r"(?:present|found|available|stated|mentioned|covered|given|provided|included|specified|described|"
         r"addressed|discussed|known|documented|listed|explained)")
_CANT = (r"(?:do not|don't|dont|did not|didn't|cannot|can't|cant|can not|could not|couldn't|couldnt|unable to|"
         r"not able to|was not able to|wasn't able to|wasnt able to|was unable to|won't be able to|failed to|"
         r"have no|lack|not in a position to)")
_ASK_VERB = (r"(?:know|answer|help|find|determine|tell|say|provide|confirm|locate|access|have|give|guess|walk you|"
             r"advise|look up|see|check|view)")
_NOT_A_CONDITION = r"(?!(?:if|when|whenever|unless|once|because|since|although|while|after|before)\b)"
_DECLINES = re.compile("|".join([
    # the speaker cannot answer
    rf"^(?:(?:i|we)(?:'m|'re| am| are)?(?: really| simply| honestly| currently)? )?{_CANT} {_ASK_VERB}\b"
    r"(?! it better| more| for sure:| of any)",
    r"^(?:i|we) have no (?:idea|information|knowledge|answer|data|clue|details|record)\b",
    r"^i(?:'m| am) not (?:\w+ )?(?:sure|certain)\b",
    r"\b(?:i|we) (?:can |am able to |are able to )?only (?:answer|help|respond|assist|handle|cover|deal with)\b",
    r"\b(?:is|are|that's|it's) (?:outside|beyond) (?:that|this|my|our|the scope|what)\b",
    r"^(?:i|we)(?:'ve| have)? (?:looked|searched|checked|gone|went|been|read|reviewed|scanned)\b[^.]*\b(?:but|and)\b"
    r"[^.]*?(?:couldn't|could not|can't|cannot|didn't|did not|wasn't able to|was unable to|found no|found nothing|"
    r"none of (?:it|them)|there(?:'s| is) (?:nothing|no)\b)",
    rf"\bso (?:i|we)(?:'m| am| are)? {_CANT} (?:answer|say|tell|help|give|determine|provide|walk you)\b",
    # the sources do not say it
    rf"(?:^|: ){_NOT_A_CONDITION}(?:[\w']+\W+){{0,3}}?{_SOURCE}\b[^.]*?\b(?:(?:do|does|did)(?: not|n't) {_TELL}|"
    rf"{_TELL}s? nothing|has no (?:entry|information|mention|section)|has nothing|(?:is|are) silent|"
    rf"(?:is|are|was|were)(?: not|n't) {_SAID})\b",
    rf"(?:\bnot|n't) (?:something |anything )?(?:{_SAID}|in)(?: anywhere)? (?:in|by) {_SOURCE}",
    rf"^(?:the answer|it|this|that|the information|this information|that information) (?:is|was)(?: not|n't) "
    rf"(?:in {_SOURCE}|{_SAID}(?: *$| (?:in|by) {_SOURCE}))",
    rf"\b(?:nothing|no part) (?:in|of) {_SOURCE}",
    rf"(?:\bnot|n't) (?:something|anything) (?:that )?{_SOURCE} {_TELL}s?\b",
    rf"^not (?:\w+ )?(?:in|from|covered by) {_SOURCE}",
    rf"^none of (?:{_SOURCE}|it|them|these|those)\b[^.]*?\b{_TELL}s?\b",
    rf"\b(?:falls?|lies|is|are) (?:outside|beyond)\b[^.]*\b{_SOURCE}",
    rf"^(?:that's|that is|this is|it's|it is) (?:beyond|outside)\b[^.]*\b{_SOURCE}",
    # there is nothing to answer with
    r"^(?:there(?: is|'s| are| was| were) )?(?:no|not enough|insufficient) (?:relevant |matching |specific |such |"
    r"available |further |additional )?(?:(?:information|answer|details?|data|context|documentation|documents?|"
    r"passages?|results?|entr(?:y|ies)|match(?:es)?|guidance|records?|policy|policies|info|content)\b(?: *$| (?:is |was |were |"
    rf"are )?(?:{_SAID}|retrieved|matches|matched|exists?|to answer)\b| (?:about|on|regarding|for|of) [^.]*\b"
    rf"(?:in|from) {_SOURCE}| (?:in|from) {_SOURCE}| (?:about|on|regarding) (?:this|that|it|the question)\b| to "
    r"(?:this|that|the|your) question)|mention\b)",
    r"^there(?: is|'s) nothing (?:in|about|on|regarding)\b",
    r"^no (?:relevant|matching) [\w-]+(?: [\w-]+)?(?: (?:was|were))? (?:found|retrieved|available)\b|"
    r"^no (?:relevant|matching) [\w-]+ *$",
    r"^no (?:answer|information|documentation|results?) (?:can|could) be found\b",
    r"^(?:answer )?not (?:found|known|stated|specified|mentioned|answerable)(?: in\b| *$| *[(\u2014\u2013-])",
    r"^(?:it |this |that |the answer |this question |the question )?(?:cannot|can't|can not|could not|couldn't) "
    r"be (?:answered|determined|found|known|inferred|deduced)\b",
    r"^(?:unknown|unanswerable|no idea|no answer(?: available| found)?|n/?a|insufficient (?:context|information)|"
    r"not covered|not in scope|can't say|cannot say|don't know)"
    r"(?: *$| *[(\u2014\u2013-]| from\b| with\b)",
]))
# What may follow a decline without making it an answer: advice on where to look or how to ask again.
_SUGGESTION = re.compile(r"^(?:please|try|you (?:may|might|could|can|should|would)|i (?:would|'d) (?:suggest|"
                         r"recommend)|consider|check|see|consult|contact|refer|ask|maybe|perhaps)\b")
# A source that only covers part of the ground declines only if what follows declines too ("My documents only
# cover the 2022 handbook; there's nothing about 2024").
_ONLY_COVERS = re.compile(rf"^{_SOURCE} (?:only|just) (?:covers?|goes? up to|describes?|includes?|contains?|"
                          r"mentions?|deals? with)\b")
_LEAD_IN = re.compile(r"^(?:(?:hmm+|well|ok|okay|alas|honestly|good question|great question|thanks|thank you|"
                      r"(?:i'm |i am )?(?:really |so |very |truly )?sorry|unfortunately|regrettably|"
                      r"i (?:sincerely |truly )?apologi[sz]e|i'm afraid|i am afraid|answer|note|result|a)\b"
                      r"[\s,:!.\u2014\u2013-]*(?:but\b\s*)?|"
                      rf"(?:based on|according to|from|given|looking at|in|after) [^,]*,\s*|"
                      r"(?:regarding|as for|about|concerning|as to) [^,:]*[,:]\s*)+")
# Sentences that only apologise, sympathise or restate the question: the next sentence is the one that counts.
_PREAMBLE = re.compile(rf"^(?:{_SOURCE} (?:covers?|includes?|describes?|deals? with|has)\b|"
                       r"you(?: asked| are asking|'re asking| want to know)|your question|i (?:sincerely |truly )?"
                       r"apologi[sz]e|(?:i'm |i am )?(?:really |so |very )?sorry|i know this|i understand|"
                       r"thanks|thank you|good question|great question)\b")
_AND_YET = re.compile(r"(?:\b(?:but|however|though|although)\b|;|\u2014|\u2013| - )")


def _declines(sentence: str) -> bool:
    """Whether a sentence (lower case, lead-in removed) declines, and what follows a "but", "however", ";" or dash
    after the decline is not an answer of three words or more (it is short, a suggestion, or declines too)."""
    declined = _DECLINES.search(sentence) or _ONLY_COVERS.match(sentence)
    if not declined:
        return False
    turn = _AND_YET.search(sentence, declined.end())
    rest = _LEAD_IN.sub("", sentence[turn.end():].strip(" ,:")) if turn else ""
    if declined.re is _ONLY_COVERS:
        return bool(rest) and _declines(rest)
    return len(rest.split()) < 3 or bool(_SUGGESTION.match(rest)) or _declines(rest)


def is_refusal(answer: str, refusal_answer: str = "") -> bool:
    """True when an answer declines: raft.yaml's refusal answer (what the student was trained to say), or a first
    sentence that says the speaker cannot answer or the sources do not say (see _DECLINES). Pass the answer part
    (answer_text), not the reasoning: reasoning often says that some document does not contain the answer on its
    way to one that does."""
    lines = [line for line in answer.splitlines() if not line.lstrip().startswith("#")]     # markdown headings
    text = " ".join(re.sub(r"[*_`]", "", " ".join(lines)).replace("\u2019", "'").split())
    text = re.sub(r"(?<=\d)\.(?=\d)", "\u00b7", text)          # "version 6.0" is not the end of a sentence
    if not text:
        return False
    if refusal_answer and " ".join(refusal_answer.split()).lower() in text.lower():
        return True
    for sentence in re.split(r"(?<=[.!?])\s+", text.lower())[:3]:
        sentence = sentence.strip(" \"'")
        content = _LEAD_IN.sub("", sentence).strip(" .!?")
        declined = bool(content) and _declines(content)
        if content and (declined or not _PREAMBLE.match(sentence)):
            return declined
    return False


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


def paired_comparison(first: Sequence[dict], second: Sequence[dict], resamples: np.ndarray) -> dict:
    """The first system against the second on the same questions: judge-score difference (first - second) with
    its paired-bootstrap 95% interval, the exact McNemar p-value, and the questions a difference of this size
    would need to be detected."""
    yes_a, yes_b = question_arrays(first)["yes"], question_arrays(second)["yes"]
    n = len(yes_a)
    b = int(((yes_a == 1) & (yes_b == 0)).sum())
    c = int(((yes_a == 0) & (yes_b == 1)).sum())
    differences = (yes_a - yes_b)[resamples].mean(axis=1)
    difference = (b - c) / n if n else 0.0
    p = mcnemar_exact_p(b, c)
    return {"questions": n, "difference": difference, "interval": _percentile_interval(differences),
            "only_first_right": b, "only_second_right": c, "mcnemar_p": p, "significant": p < 0.05,
            "questions_needed": questions_needed(difference, (b + c) / n if n else 0.0)}



# ---- can the judge be trusted? ---------------------------------------------------------------------------------
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
# Sentences no document of any corpus states: added to a gold answer, the groundedness judge must mark them
# unsupported.
FABRICATIONS = ("It was first announced at a press event in Reykjavik in 1998.",
                "The feature was designed by a team of twelve marine biologists.",
                "Using it costs a licence fee of 40 euros per month.",
                "Its name comes from a small river in southern Peru.",
                "The first version ran only on Amiga computers.",
                "It was tested for three years on a research station in Antarctica.")


def near_miss(gold: str, others: Sequence[str], rng: random.Random) -> Optional[str]:
    """The gold answer with one fact changed, which a judge must call wrong: a number's last digit, else a month,
    else a name (a capitalised word after the first) taken from another gold answer. None when it has none."""
    numbers = list(re.finditer(r"\d", gold))
    if numbers:
        last = [m for m in numbers if m.end() == len(gold) or not gold[m.end()].isdigit()]
        place = rng.choice(last).start()
        digit = str((int(gold[place]) + rng.randint(1, 8)) % 10)
        return gold[:place] + digit + gold[place + 1:]
    months = [m for m in MONTHS if re.search(rf"\b{m}\b", gold)]
    if months:
        month = rng.choice(months)
        return re.sub(rf"\b{month}\b", rng.choice([m for m in MONTHS if m != month]), gold, count=1)
    names = re.findall(r"(?<=\s)[A-Z][a-zA-Z]+", gold)
    replacements = sorted({w for other in others for w in re.findall(r"(?<=\s)[A-Z][a-zA-Z]+", other)} - set(names))
    if names and replacements:
        name = rng.choice(names)
        return re.sub(rf"\b{name}\b", rng.choice(replacements), gold, count=1)
    return None


def calibration_controls(gold_answers: Sequence[str], refusal_answer: str, seed: int) -> list[dict]:
    """Answers whose verdict is known, built from the eval file itself: each question's own gold answer (the judge
    must say YES), the gold answer of another question with a different answer (NO), the refusal answer (NO; YES
    where the gold answer is itself a refusal, for then declining is right), and a near miss, the gold answer with
    one number, month or name changed (NO). Drawn with the seed."""
    rng = random.Random(seed)
    normalised = [squad_normalise(g) for g in gold_answers]
    declines = [is_refusal(g, refusal_answer) for g in gold_answers]
    controls = []
    for i, gold in enumerate(gold_answers):
        controls.append({"question": i, "kind": "gold", "answer": gold, "expected": True})
        for _ in range(50):               # a few draws find a question with another answer, if there is one
            j = rng.randrange(len(gold_answers))
            if normalised[j] != normalised[i] and not (declines[i] and declines[j]):
                controls.append({"question": i, "kind": "other", "answer": gold_answers[j], "expected": False})
                break
        if refusal_answer:
            controls.append({"question": i, "kind": "refusal", "answer": refusal_answer, "expected": declines[i]})
        missed = None if declines[i] else near_miss(gold, gold_answers[:i] + gold_answers[i + 1:], rng)
        if missed and squad_normalise(missed) != normalised[i]:
            controls.append({"question": i, "kind": "near_miss", "answer": missed, "expected": False})
    return controls


def addition_controls(gold_answers: Sequence[str], refusal_answer: str, seed: int) -> list[dict]:
    """For the groundedness judge: each gold answer (not a refusal) with one fabricated sentence added, which it
    must mark unsupported."""
    rng = random.Random(seed)
    return [{"question": i, "kind": "addition", "addition": (addition := rng.choice(FABRICATIONS)),
             "answer": f"{gold.rstrip()} {addition}" if gold.rstrip().endswith((".", "!", "?"))
             else f"{gold.rstrip()}. {addition}"}
            for i, gold in enumerate(gold_answers) if not is_refusal(gold, refusal_answer)]


def addition_flagged(control: dict) -> bool:
    """Whether the judge marked the fabricated sentence unsupported: a claim sharing at least half of its content
    words is unsupported."""
    wanted = set(content_words(control["addition"]))
    return any(not claim["supported"] and len(wanted & set(content_words(claim["claim"]))) >= len(wanted) / 2
               for claim in control.get("claims") or [])


CONTROL_KINDS = {"gold": "its own gold answer", "other": "another question's gold answer",
                 "refusal": "the refusal answer", "near_miss": "its gold answer with one fact changed"}


def _rate(count: int, total: int) -> dict:
    return {"count": count, "total": total, "rate": count / total if total else None,
            "interval": wilson_interval(count, total)}


def calibration_summary(controls: Sequence[dict], threshold: float, additions: Sequence[dict] = ()) -> dict:
    """The judge's rates on the controls (each with its 'verdict'), with Wilson intervals and plain warnings. The
    easy controls give the true-positive and true-negative rates; the hard ones its leniency: YES to a near miss,
    and (with `additions`, judged for groundedness) a fabricated sentence not marked unsupported. A rate below
    `threshold`, or a leniency above 1 - threshold, is a warning. An unparseable verdict counts against the rate it
    belongs to."""
    right = [c for c in controls if c["expected"]]
    wrong = [c for c in controls if not c["expected"] and c["kind"] != "near_miss"]
    near = [c for c in controls if c["kind"] == "near_miss"]
    accepted_right = sum(c["verdict"] is True for c in right)
    rejected_wrong = sum(c["verdict"] is False for c in wrong)
    accepted_wrong = sum(c["verdict"] is True for c in wrong)
    unparseable = sum(c["verdict"] is None for c in controls)
    rate = lambda k, n: k / n if n else None
    summary = {
        "true_positive_rate": rate(accepted_right, len(right)),
        "true_positive_interval": wilson_interval(accepted_right, len(right)),
        "accepted_right": accepted_right, "right_controls": len(right),
        "true_negative_rate": rate(rejected_wrong, len(wrong)),
        "true_negative_interval": wilson_interval(rejected_wrong, len(wrong)),
        "rejected_wrong": rejected_wrong, "accepted_wrong": accepted_wrong, "wrong_controls": len(wrong),
        "unparseable_rate": rate(unparseable, len(controls)),
        "unparseable_interval": wilson_interval(unparseable, len(controls)), "unparseable": unparseable,
        "near_miss_leniency": _rate(sum(c["verdict"] is True for c in near), len(near)),
        "addition_leniency": _rate(sum(not addition_flagged(c) for c in additions), len(additions)),
        "by_kind": {kind: {"controls": sum(c["kind"] == kind for c in controls),
                           "yes": sum(c["kind"] == kind and c["verdict"] is True for c in controls),
                           "no": sum(c["kind"] == kind and c["verdict"] is False for c in controls)}
                    for kind in CONTROL_KINDS if any(c["kind"] == kind for c in controls)},
        "threshold": threshold,
    }
    summary["warnings"] = calibration_warnings(summary, len(wrong) - accepted_wrong - rejected_wrong)
    lenient = [summary[k]["rate"] for k in ("near_miss_leniency", "addition_leniency")]
    summary["hard_controls_pass"] = not summary["warnings"] and all(r is not None and r <= 1 - threshold
                                                                    for r in lenient)
    return summary


def calibration_warnings(s: dict, unread_wrong: int) -> list[str]:
    warnings, threshold = [], s["threshold"]
    if s["wrong_controls"] and s["true_negative_rate"] < threshold:
        warnings.append(f"the judge accepted {s['accepted_wrong']} of {s['wrong_controls']} wrong answers"
                        + (f" and could not be read on {unread_wrong}" if unread_wrong else "")
                        + ": its scores are not reliable")
    if s["right_controls"] and s["true_positive_rate"] < threshold:
        warnings.append(f"the judge accepted only {s['accepted_right']} of {s['right_controls']} gold answers as "
                        "correct: its scores are not reliable")
    near, added = s["near_miss_leniency"], s["addition_leniency"]
    if near["total"] and near["rate"] > 1 - threshold:
        warnings.append(f"the judge accepted {near['count']} of {near['total']} near misses (a gold answer with one "
                        "number, month or name changed): it is lenient on details")
    if added["total"] and added["rate"] > 1 - threshold:
        warnings.append(f"the groundedness judge missed {added['count']} of {added['total']} fabricated sentences "
                        "added to a gold answer: its groundedness scores overstate support")
    return warnings
