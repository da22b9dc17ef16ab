"""Can the judge be trusted? Control answers whose verdict is known, built from the eval file itself, and what the
judge made of them: its true-positive and true-negative rates on the easy controls and its leniency on the hard ones
(near misses; fabricated sentences for the groundedness judge), with Wilson intervals and plain warnings.

Used by raft_eval.py; report.py shows the summary first.
"""
import random
import re
from typing import Optional, Sequence

from metrics import squad_normalise, wilson_interval
from refusal import is_refusal
from text import content_words

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


def controls(gold_answers: Sequence[str], refusal_answer: str, seed: int) -> list[dict]:
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


def additions(gold_answers: Sequence[str], refusal_answer: str, seed: int) -> list[dict]:
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


def summary(controls: Sequence[dict], threshold: float, additions: Sequence[dict] = ()) -> dict:
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
    summary["warnings"] = warnings_of(summary, len(wrong) - accepted_wrong - rejected_wrong)
    lenient = [summary[k]["rate"] for k in ("near_miss_leniency", "addition_leniency")]
    summary["hard_controls_pass"] = not summary["warnings"] and all(r is not None and r <= 1 - threshold
                                                                    for r in lenient)
    return summary


def warnings_of(s: dict, unread_wrong: int) -> list[str]:
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
