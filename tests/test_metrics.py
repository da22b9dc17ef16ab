"""Each metric against values computed by hand."""
import pytest

import metrics
from retrieval import reciprocal_rank_fusion

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
    ("No, the answer says 8B but the gold is 70B.", False),   # the first word decides
    ("I think yes, but no", None),                             # yes and no, neither first: not guessed
    ("The answer is correct.", True), ("The answer is incorrect.", False), ("That is wrong", False),
    ("It is not correct.", False), ("Partly correct, partly wrong", None),
    ("Maybe", None), ("", None), (None, None), ("Yesterday", None), ("Nobody knows", None)])
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
    assert metrics.is_refusal(answer, REFUSAL) is refused


def test_precision():
    assert metrics.precision(0.5, 0.25) == pytest.approx(2 / 3)
    assert metrics.precision(0.0, 0.0) == 0.0
    assert metrics.precision(0.0, 1.0) is None      # refused everything: nothing to be precise about


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
    assert m["judge_score"] == 0.25 and m["refusal_rate"] == 0.25 and m["precision"] == pytest.approx(1 / 3)
    assert m["rouge1"] == pytest.approx(1.5 / 4) and m["rouge2"] == 0.25 and m["exact_match"] == 0.25


def test_reciprocal_rank_fusion_by_hand():
    # a: 1/61 + 1/63; b: 1/62 + 1/61; c: 1/63 + 1/62; d: 1/64 -> b > a > c > d
    assert reciprocal_rank_fusion([["a", "b", "c", "d"], ["b", "c", "a"]]) == ["b", "a", "c", "d"]
    assert reciprocal_rank_fusion([["x", "y"], ["y", "x"]]) == ["x", "y"]     # a tie keeps first-seen order
    assert reciprocal_rank_fusion([[1, 2], [3]], k=0) == [1, 3, 2]           # 1/1, 1/1, 1/2


def test_support_recall_by_hand():
    from raft_utils import Chunk
    chunks = [Chunk("Llama 3.1 reads 128K tokens.", "a"), Chunk("vLLM listens on port 8000.", "b")]
    rankings = [[1, 0], [0, 1], [0, 1]]
    answers = ["128K tokens", "port 8000", "Yes"]        # the third has no content word: left out
    assert metrics.support_recall(rankings, chunks, answers, 1) == 0.0
    assert metrics.support_recall(rankings, chunks, answers, 2) == 1.0
    assert metrics.support_recall([[0]], chunks, ["Yes"], 1) is None
