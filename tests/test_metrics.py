"""Each metric against values computed by hand."""
import json
import random

import pytest

import calibration
import metrics
from refusal import is_refusal
from retrieval import reciprocal_rank_fusion
from tests.conftest import FIXTURES

REFUSAL = "Sorry, I don't know the answer to this question because related documents are not found. Please try again."


def test_rouge_by_hand():
    # reference "blue whale", prediction "the blue whale swims" (stemmed: the blue whale swim)
    # ROUGE-1: 2 of 4 predicted words match, 2 of 2 reference words: F = 2 * 0.5 * 1 / 1.5 = 2/3
    # ROUGE-2: 1 of 3 predicted bigrams, 1 of 1 reference bigram: F = 2 * (1/3) / (4/3) = 0.5
    scores = metrics.rouge("the blue whale swims", "blue whale")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(0.5)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert metrics.rouge("Tokens", "token") == {"rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0}   # stemming
    assert metrics.rouge("", "blue whale")["rouge1"] == 0.0


def test_exact_match_uses_squad_normalisation():
    assert metrics.squad_normalise("The  Llama-3 model, of course!") == "llama3 model of course"
    assert metrics.exact_match("the 128K tokens.", "128k Tokens")
    assert not metrics.exact_match("128K tokens total", "128K tokens")


def test_answer_text_prefers_the_answer_part():
    assert metrics.answer_text("Reasoning ##begin_quote## x ##end_quote##\n<ANSWER>: 8 GPUs") == "8 GPUs"
    assert metrics.answer_text("  Just a plain reply. ") == "Just a plain reply."
    assert metrics.answer_text("") == ""


@pytest.mark.parametrize("reply, verdict", [
    ("YES", True), ("no", False), ("Yes.", True), ("**NO**", False), ("`yes`", True),
    ("Verdict: YES", True), ("The answer is correct, so yes.", True),
    ("No, the answer says 8B but the gold is 70B.", False),   # the first decisive word decides
    ("The answer is correct; there is no contradiction.", True), ("I think yes, but no", True),
    ("The answer is correct.", True), ("The answer is incorrect.", False), ("That is wrong", False),
    ("It is not correct.", False), ("Not wrong at all.", True), ("Partly wrong, partly correct", False),
    ("Maybe", None), ("", None), (None, None), ("Yesterday", None), ("Nobody knows", None), ("Correctness", None)])
def test_parse_verdict(reply, verdict):
    assert metrics.parse_verdict(reply) is verdict


@pytest.mark.parametrize("answer, refused", [
    (REFUSAL, True),
    ("sorry, i don't   know the answer to this question because related documents are not found. please try again.", True),
    ("I don't know.", True), ("I do not know the answer.", True), ("I don’t know", True),
    ("The documents do not contain the answer.", True), ("The context doesn't mention it.", True),
    ("There is not enough information to answer.", True), ("I am unable to answer that.", True),
    ("Unknown.", True), ("I'm not sure.", True),
    ("128K tokens", False), ("The licence is not open source.", False), ("an unknown number of tokens", False),
    ("", False)])
def test_is_refusal(answer, refused):
    assert is_refusal(answer, REFUSAL) is refused


def test_precision_counts_only_judged_answers_that_did_not_decline():
    row = dict(verdict=True, refusal=False, failed=False)
    rows = [row, {**row, "verdict": False}, {**row, "verdict": None},          # unparseable: says nothing
            {**row, "failed": True, "verdict": None}, {**row, "refusal": True, "verdict": True}]   # a refusal judged YES
    assert metrics.precision(rows) == 0.5
    assert metrics.precision([row] * 3) == 1.0                                 # never above 1
    assert metrics.precision([{**row, "refusal": True}]) is None               # refused everything


def test_answer_supported():
    text = "Llama 3.1 supports a context length of 128K tokens."
    assert metrics.answer_supported(text, "128K tokens")
    assert metrics.answer_supported(text, "a context of 128K tokens, for every size")   # 4 of 6 content words
    assert not metrics.answer_supported(text, "8K tokens on every model")                 # 1 of 4
    assert not metrics.answer_supported(text, "128K window")                             # exactly half: not most
    assert metrics.answer_supported(text, "Yes") is None


def test_summarise_by_hand():
    row = dict(rouge1=1.0, rouge2=1.0, rougeL=1.0, exact_match=True, verdict=True, refusal=False, failed=False)
    rows = [row,
            {**row, "rouge1": 0.5, "rouge2": 0.0, "rougeL": 0.5, "exact_match": False, "verdict": False},
            {**row, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": False, "verdict": False, "refusal": True},
            {**row, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": False, "verdict": None}]
    m = metrics.summarise(rows)
    assert m["questions"] == 4 and m["judge_yes"] == 1 and m["judge_unparseable"] == 1 and m["refusals"] == 1
    # precision: 1 YES among the 2 judged answers that did not decline (the refusal and the unparseable one say nothing)
    assert m["judge_score"] == 0.25 and m["refusal_rate"] == 0.25 and m["precision"] == 0.5
    assert m["rouge1"] == pytest.approx(1.5 / 4) and m["rouge2"] == 0.25 and m["exact_match"] == 0.25


def test_reciprocal_rank_fusion_by_hand():
    # a: 1/61 + 1/63; b: 1/62 + 1/61; c: 1/63 + 1/62; d: 1/64 -> b > a > c > d
    assert reciprocal_rank_fusion([["a", "b", "c", "d"], ["b", "c", "a"]]) == ["b", "a", "c", "d"]
    assert reciprocal_rank_fusion([["x", "y"], ["y", "x"]]) == ["x", "y"]     # a tie keeps first-seen order
    assert reciprocal_rank_fusion([[1, 2], [3]], k=0) == [1, 3, 2]           # 1/1, 1/1, 1/2


def test_support_recall_by_hand():
    from documents import Chunk
    chunks = [Chunk("Llama 3.1 reads 128K tokens.", "a"), Chunk("vLLM listens on port 8000.", "b")]
    rankings = [[1, 0], [0, 1], [0, 1]]
    answers = ["128K tokens", "port 8000", "Yes"]        # the third has no content word: left out
    assert metrics.support_recall(rankings, chunks, answers, 1) == 0.0
    assert metrics.support_recall(rankings, chunks, answers, 2) == 1.0
    assert metrics.support_recall([[0]], chunks, ["Yes"], 1) is None


# ---- intervals and comparisons -----------------------------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38415 = 0.71683, half 1.96 * sqrt(0.016 + 0.00096) / 1.38415 = 0.18443
    low, high = metrics.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert metrics.wilson_interval(0, 20)[0] == 0.0 and metrics.wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)
    assert metrics.wilson_interval(5, 0) is None


def test_bootstrap_intervals_cover_a_known_proportion():
    """Questions a system gets right with probability 0.6: the 95% interval must contain 0.6 in about 95% of
    repeated evaluations (checked over 300 synthetic evaluations of 80 questions)."""
    rng = random.Random(0)
    covered = 0
    for trial in range(300):
        rows = [dict(verdict=rng.random() < 0.6, refusal=False, failed=False, exact_match=False, rougeL=0.0)
                for _ in range(80)]
        low, high = metrics.bootstrap_intervals(rows, metrics.resample_indices(80, 400, seed=trial))["judge_score"]
        covered += low <= 0.6 <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_mcnemar_by_hand():
    # b = 8, c = 2: P(X <= 2 | n = 10, 1/2) = (1 + 10 + 45) / 1024 = 0.0546875; two-sided 0.109375
    assert metrics.mcnemar_exact_p(8, 2) == pytest.approx(0.109375)
    assert metrics.mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    assert metrics.mcnemar_exact_p(3, 3) == 1.0 and metrics.mcnemar_exact_p(0, 0) == 1.0


def test_questions_needed_by_hand():
    # d = 0.1, discordant 0.3: (1.96 sqrt(0.3) + 0.8416 sqrt(0.29))^2 / 0.01 = (1.07353 + 0.45322)^2 / 0.01 = 233.1
    assert metrics.questions_needed(0.1, 0.3) == 234
    assert metrics.questions_needed(0.0, 0.3) is None


def test_paired_comparison_by_hand():
    row = dict(refusal=False, failed=False, exact_match=False, rougeL=0.0)
    first = [{**row, "verdict": v} for v in [True] * 6 + [False] * 4]
    second = [{**row, "verdict": v} for v in [True, False, False, False, False, False, True, True, False, False]]
    c = metrics.paired_comparison(first, second, metrics.resample_indices(10, 2000, seed=1))
    assert (c["only_first_right"], c["only_second_right"], c["difference"]) == (5, 2, pytest.approx(0.3))
    assert c["mcnemar_p"] == pytest.approx(2 * (1 + 7 + 21) / 128) and not c["significant"]
    low, high = c["interval"]
    assert low < 0.3 < high


def test_calibration_of_a_judge_that_says_yes_to_everything():
    controls = calibration.controls(["8 GPUs", "128K tokens", "Yes", "yes"], REFUSAL, seed=0)
    kinds = [c["kind"] for c in controls]
    assert kinds.count("gold") == 4 and kinds.count("refusal") == 4
    assert kinds.count("other") == 4         # "Yes" and "yes" are the same answer: their wrong one is drawn elsewhere
    assert [c["answer"] for c in controls if c["kind"] == "near_miss"] == ["9 GPUs", "125K tokens"]    # a digit
    for c in controls:
        if c["kind"] == "other":
            assert metrics.squad_normalise(c["answer"]) != metrics.squad_normalise(["8 GPUs", "128K tokens", "Yes", "yes"][c["question"]])
    for c in controls:
        c["verdict"] = True
    summary = calibration.summary(controls, 0.9)
    assert summary["true_positive_rate"] == 1.0 and summary["true_negative_rate"] == 0.0
    assert summary["warnings"] == ["the judge accepted 8 of 8 wrong answers: its scores are not reliable",
                                   "the judge accepted 2 of 2 near misses (a gold answer with one number, month or "
                                   "name changed): it is lenient on details"]
    assert summary["near_miss_leniency"]["rate"] == 1.0 and not summary["hard_controls_pass"]
    for c in controls:
        c["verdict"] = c["expected"]
    assert calibration.summary(controls, 0.9)["warnings"] == []


# ---- the refusal detector, measured ----------------------------------------------------------------------------
REFUSAL_SETS = ["refusal_answers", "refusal_answers_blind1", "refusal_answers_blind2", "refusal_answers_blind3"]


@pytest.mark.parametrize("name", REFUSAL_SETS)
def test_the_refusal_detector_has_precision_and_recall_of_097_on_each_labelled_set(name):
    """tests/fixtures: 176 answers written with the rules, then three sets written apart from them, each first
    measured blind (recall 0.46, 0.43, 0.67; docs/evaluation.md) and then used to widen the rules."""
    items = json.loads((FIXTURES / f"{name}.json").read_text())
    found = [is_refusal(item["answer"], REFUSAL) for item in items]
    true_pos = sum(f and i["refusal"] for f, i in zip(found, items))
    precision = true_pos / sum(found)
    recall = true_pos / sum(i["refusal"] for i in items)
    assert len(items) >= 140 and precision >= 0.97 and recall >= 0.97, (precision, recall)


def test_the_two_answers_the_old_detector_took_for_refusals():
    assert not is_refusal("Llama Guard stores no information about the user ...", REFUSAL)
    assert not is_refusal("I can't say it better than the guide: use tensor_parallel_size=8.", REFUSAL)


# ---- metrics against the gold answer and the sources --------------------------------------------------------------
@pytest.mark.parametrize("prediction, reference, f1", [
    ("The cat sat", "a cat sat down", 0.8),            # cat sat: precision 2/2, recall 2/3 (articles dropped)
    ("42 units", "42 units", 1.0), ("", "", 1.0), ("", "42", 0.0), ("blue blue whale", "blue whale", 0.8),
    ("Port 8000!", "port 8000", 1.0), ("nothing alike", "different words", 0.0)])
def test_token_f1_by_hand(prediction, reference, f1):
    assert metrics.token_f1(prediction, reference) == pytest.approx(f1)


def test_quote_support_by_hand():
    chunks = ["Llama 3 has a context length of 8K tokens.", "Prompt Guard   is a classifier."]
    reply = ("##begin_quote## context length of 8K tokens ##end_quote## and ##begin_quote## Prompt Guard is a "
             "classifier. ##end_quote## but ##begin_quote## 128K tokens ##end_quote##")
    assert metrics.quote_support(reply, chunks) == pytest.approx(2 / 3)
    assert metrics.quote_support("##begin_quote## “context length” ##end_quote##", chunks) == 1.0   # quote marks
    assert metrics.quote_support("##begin_quote## tokens. Prompt ##end_quote##", chunks) == 1.0     # across chunks
    assert metrics.quote_support("##begin_quote## ext len ##end_quote##", chunks) == 0.0            # whole words
    assert metrics.quote_support("##begin_quote## context Length ##end_quote##", chunks) == 0.0     # case counts
    assert metrics.quote_support("no quote at all", chunks) is None
    assert metrics.quote_support("##begin_quote## never closed", chunks) is None
    assert metrics.quote_support("##begin_quote## context length ##end_quote##", []) == 0.0         # nothing given


def test_claims_and_groundedness_by_hand():
    reply = ("1. **SUPPORTED**: The context length is 8K tokens.\n- UNSUPPORTED: It was released in 1998.\n"
             "Not supported - It runs on Amiga.\nSome commentary the parser skips.")
    claims = metrics.parse_claims(reply)
    assert claims == [{"claim": "The context length is 8K tokens.", "supported": True},
                      {"claim": "It was released in 1998.", "supported": False},
                      {"claim": "It runs on Amiga.", "supported": False}]
    assert metrics.groundedness(claims) == pytest.approx(1 / 3)
    assert metrics.parse_claims("NONE") == [] and metrics.groundedness([]) is None


def test_holm_by_hand():
    assert metrics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert metrics.holm([0.5]) == [0.5] and metrics.holm([]) == []


def test_near_misses_change_one_fact():
    rng = random.Random(3)
    assert calibration.near_miss("released in July 2023", [], rng) == "released in July 2026"      # the last digit
    changed = calibration.near_miss("released in July", [], random.Random(0))
    assert changed.startswith("released in ") and changed != "released in July" and changed.split()[-1] in calibration.MONTHS
    assert calibration.near_miss("made by Meta", ["made by Google"], random.Random(0)) == "made by Google"
    assert calibration.near_miss("grouped-query attention", ["other"], random.Random(0)) is None


def test_controls_know_when_declining_is_right_and_additions_are_checked_by_their_claims():
    golds = ["The documents do not say.", "8 GPUs"]
    controls = calibration.controls(golds, REFUSAL, seed=0)
    refusal_controls = {c["question"]: c["expected"] for c in controls if c["kind"] == "refusal"}
    assert refusal_controls == {0: True, 1: False}     # declining is the right answer to the first question
    assert not any(c["kind"] == "near_miss" and c["question"] == 0 for c in controls)
    [addition] = calibration.additions(golds, REFUSAL, seed=0)
    assert addition["question"] == 1 and addition["answer"] == f"8 GPUs. {addition['addition']}"
    addition["claims"] = [{"claim": "It needs 8 GPUs.", "supported": True},
                          {"claim": addition["addition"].rstrip("."), "supported": False}]
    assert calibration.addition_flagged(addition)
    addition["claims"][1]["supported"] = True
    assert not calibration.addition_flagged(addition)
    summary = calibration.summary([{**c, "verdict": c["expected"]} for c in controls], 0.9, [addition])
    assert summary["addition_leniency"]["rate"] == 1.0 and not summary["hard_controls_pass"]
    assert summary["near_miss_leniency"] == {"count": 0, "total": 1, "rate": 0.0,
                                             "interval": metrics.wilson_interval(0, 1)}


def test_partial_metrics_are_averaged_over_the_answers_that_have_them():
    row = dict(verdict=True, refusal=False, failed=False, exact_match=True, rouge1=1.0, rouge2=1.0, rougeL=1.0,
               token_f1=1.0, similarity=0.9)
    rows = [{**row, "quote_support": 0.5, "groundedness": None}, {**row, "quote_support": None, "groundedness": 1.0},
            {**row, "quote_support": 1.0, "groundedness": 0.0, "similarity": None}]
    summary = metrics.summarise(rows)
    assert summary["quote_support"] == 0.75 and summary["answers_with_quotes"] == 2
    assert summary["groundedness"] == 0.5 and summary["answers_with_claims"] == 2
    assert summary["similarity"] == pytest.approx(0.9) and summary["answers_compared"] == 2
    intervals = metrics.bootstrap_intervals(rows, metrics.resample_indices(3, 500, seed=0))
    assert intervals["token_f1"] == [1.0, 1.0] and 0.5 <= intervals["quote_support"][0] <= 0.75
