"""The quality stage (quality.py): each filter on planted faults, the labelled set's targets, the records and the
data card raft.py writes, and the same result when run alone on a finished folder."""
import json
import re

import pytest
import yaml

import quality
import raft
from config import RAFT_SCHEMA, load_config
from documents import Chunk
from raft_utils import QA
from tests.conftest import ROOT, write_corpus
from tests.fake_server import FakeOpenAI, Reply
from tests.quality_set import answer_quoting, build

SETTINGS = load_config(str(ROOT / "raft.yaml"), RAFT_SCHEMA)["quality"]
CHUNKS = [Chunk("Llama 3 has a context length of 8K tokens. It was released in April 2024 by Meta.", "a.md"),
          Chunk("Prompt Guard is a classifier with three labels: benign, injection and jailbreak.", "b.md"),
          Chunk("The vLLM server listens on port 8000 by default and batches requests continuously.", "c.md")]


def judged(qas: list[QA], **changes) -> list:
    return quality.QualityStage({**SETTINGS, **changes}, CHUNKS).judge(qas)


def verdict(qa: QA, **changes):
    dropped = judged([qa], **changes)[0].dropped
    return (dropped.filter, dropped.value) if dropped else None


def good(chunk: int, question: str, sentence: str, answer: str = "yes") -> QA:
    return QA(chunk, question, answer_quoting(sentence, answer), True)


def test_answer_checks():
    assert verdict(good(0, "What is the context length of Llama 3?", "context length of 8K tokens", "8K")) is None
    missing = QA(0, "What is the context length of Llama 3?", "It is 8K.", True)
    assert verdict(missing) == ("answer: no <ANSWER>:", "It is 8K.")
    assert verdict(QA(0, "What is the context length of Llama 3?", "So: <ANSWER>:", True))[0] == "answer: empty <ANSWER>:"
    invented = good(0, "What is the context length of Llama 3?", "It has 128K tokens of context", "128K")
    assert verdict(invented)[0] == "answer: quote not in the oracle chunk"
    assert verdict(invented, answer_checks=False) is None


@pytest.mark.parametrize("question, why", [
    ("Llama 3 has a context length of 8K tokens.", "question: not a question"), ("Why?", "question: too short"),
    ("What " + "really " * 70 + "is it?", "question: too long")])
def test_question_checks(question, why):
    assert verdict(good(0, question, "context length of 8K tokens"))[0] == why
    assert verdict(good(0, question, "context length of 8K tokens"), question_checks=False, round_trip=False) is None


def test_duplicates_exact_and_near_within_a_chunk_and_across_the_corpus():
    first = good(0, "What is the context length of Llama 3?", "context length of 8K tokens")
    qas = [first, first, QA(1, first.question, first.cot_answer, True),
           good(0, "How long is the context window of Llama 3?", "context length of 8K tokens"),
           good(0, "When was Llama 3 released?", "released in April 2024")]
    verdicts = [qa.dropped for qa in judged(qas, round_trip=False, answer_checks=False)]
    assert verdicts[0] is None and verdicts[4] is None
    assert (verdicts[1].filter, verdicts[1].value) == ("duplicate: exact, within its chunk", first.question)
    assert verdicts[2].filter == "duplicate: exact, across the corpus"
    assert verdicts[3].filter == "duplicate: near, within its chunk" and verdicts[3].value.endswith(first.question)
    jaccard = judged(qas, round_trip=False, answer_checks=False, duplicate_method="jaccard", duplicate_threshold=0.6)
    assert [bool(qa.dropped) for qa in jaccard] == [False, True, True, False, False]   # the rewording shares few words


def test_questions_that_differ_in_a_number_are_not_near_duplicates():
    qas = [good(0, "What is the context length of Llama 3?", "context length of 8K tokens"),
           good(0, "What is the context length of Llama 2?", "context length of 8K tokens"),
           good(0, "What is the context length of Llama-3?", "context length of 8K tokens")]
    assert [bool(qa.dropped) for qa in judged(qas, round_trip=False, answer_checks=False)] == [False, False, True]


def test_duplicates_are_remembered_across_windows():
    stage = quality.QualityStage({**SETTINGS, "round_trip": False}, CHUNKS)
    qa = good(2, "Which port does the vLLM server listen on?", "listens on port 8000 by default", "8000")
    assert stage.judge([qa])[0].dropped is None
    assert stage.judge([qa])[0].dropped.filter == "duplicate: exact, within its chunk"


def test_the_round_trip_drops_a_question_about_another_chunk_and_one_copied_from_its_chunk():
    right = good(2, "Which port does the vLLM server listen on?", "listens on port 8000 by default", "8000")
    wrong = good(1, "Which port does the vLLM server listen on by default?", "classifier with three labels", "8000")
    copied = good(0, "Llama 3 has a context length of 8K tokens?", "context length of 8K tokens")
    stage = quality.QualityStage({**SETTINGS, "round_trip_k": 1, "answer_checks": False, "duplicates": False}, CHUNKS)
    results = stage.judge([right, wrong, copied])
    assert [qa.oracle_rank for qa in results] == [1, None, 1]
    assert results[0].dropped is None
    assert (results[1].dropped.filter, results[1].dropped.value) == ("round trip: oracle not retrieved",
                                                                     "not in the top 1")
    assert results[2].dropped.filter == "round trip: copied from the chunk" and results[2].dropped.value == 1.0


def test_copied_share_by_hand():
    oracle = "Llama 3 has a context length of 8K tokens. It was released in April 2024 by Meta."
    assert quality.copied_share("Is it true that it was released in April 2024 by Meta?", oracle) == 8 / 11
    assert quality.copied_share("What is the context length of Llama 3?", oracle) == pytest.approx(3 / 7)
    assert quality.copied_share("Why?", oracle) == 0.0


def test_the_teacher_grade_drops_below_the_threshold_and_keeps_an_unreadable_grade():
    grades = {"Which port does the vLLM server listen on?": "5", "Where is the vLLM server?": "Grade: 2",
              "What does the vLLM server do?": "hard to say"}
    with FakeOpenAI() as teacher:
        teacher.script = lambda body, n: Reply(content=grades[body["messages"][-1]["content"].split("Question: ")[1]
                                                              .split("\n")[0]])
        from llm_client import ChatClient
        client = ChatClient([teacher.url], model="teacher", max_retries=0)
        stage = quality.QualityStage({**SETTINGS, "teacher_grade": True, "round_trip": False, "duplicates": False},
                                     CHUNKS, client, {"max_tokens": 8})
        results = stage.judge([good(2, q, "listens on port 8000 by default", "8000") for q in grades])
        client.close()
    assert [qa.dropped.value if qa.dropped else None for qa in results] == [None, 2, None]
    assert results[1].dropped.filter == "grade: below the threshold"


def test_the_labelled_set_meets_its_targets():
    """The defaults of raft.yaml on tests/quality_set.py: the figures of docs/generation.md (bench/quality_filters.py
    prints them by kind)."""
    chunks, labelled = build()
    results = quality.QualityStage(SETTINGS, chunks).judge([item.qa for item in labelled])
    faults = [(item, qa) for item, qa in zip(labelled, results) if item.fault]
    goods = [(item, qa) for item, qa in zip(labelled, results) if not item.fault]
    hard = "paraphrased duplicate, another register"
    caught = sum(bool(qa.dropped) for _, qa in faults) / len(faults)
    caught_but_hard = sum(bool(qa.dropped) for item, qa in faults if item.kind != hard) / \
        sum(item.kind != hard for item, _ in faults)
    good_dropped = sum(bool(qa.dropped) for _, qa in goods) / len(goods)
    assert caught >= 0.85 and caught_but_hard >= 0.95 and good_dropped <= 0.05, (caught, caught_but_hard, good_dropped)
    plain = [qa for item, qa in goods if "plain" in item.kind]
    assert not any(qa.dropped for qa in plain)


# ---- in raft.py, and alone --------------------------------------------------------------------------------------
def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scripted(body, n):
    """The default teacher, with one answer that quotes what its chunk lacks and one question copied from it."""
    text = body["messages"][-1]["content"]
    if "Fact 1.0.0" in text and "Question:" in text:
        return Reply(content="##begin_quote## an invented sentence ##end_quote##\n<ANSWER>: invented")
    return None


def test_raft_writes_the_dropped_records_and_a_data_card_and_the_same_seed_drops_the_same(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    with FakeOpenAI() as teacher:
        teacher.script = scripted
        for out in ("a", "b"):
            assert raft.main(["-u", teacher.url, "--data_dir", str(corpus), "-t", "2", "-o", str(tmp_path / out),
                              "--cache_path", str(tmp_path / "cache.sqlite")]) == 0
    a = tmp_path / "a"
    kept, dropped = read_jsonl(a / "raft.jsonl"), read_jsonl(a / "filtered_out.jsonl")
    assert dropped and all(r["filter"] == "answer: quote not in the oracle chunk" and "Fact 1.0.0" in r["oracle_context"]
                           for r in dropped)
    assert all("oracle_rank" in r for r in kept + dropped) and any(r["oracle_rank"] == 1 for r in kept)
    counts = json.loads((a / "raft_run.json").read_text())["counts"]
    assert counts["filtered"] == {"answer: quote not in the oracle chunk": len({r["question"] for r in dropped})}
    assert counts["filtered records"] == len(dropped) and counts["examples"] == len(kept)
    card = (a / "data_card.md").read_text()
    for section in ("## Counts at each stage", "## What the filters dropped", "| kind | questions |",
                    "| source file | questions |", "## The oracle chunk's rank", "## Examples", "## Settings"):
        assert section in card
    assert "answer: quote not in the oracle chunk" in card
    for name in ("raft.jsonl", "filtered_out.jsonl", "data_card.md"):
        assert (a / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_quality_alone_on_a_finished_folder_drops_what_raft_drops(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    config = yaml.safe_load((ROOT / "raft.yaml").read_text())
    for name in ("answer_checks", "question_checks", "duplicates", "round_trip"):
        config["quality"][name] = False
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(config))
    with FakeOpenAI() as teacher:
        teacher.script = scripted
        args = ["-u", teacher.url, "--data_dir", str(corpus), "-t", "2", "--cache_path", str(tmp_path / "c.sqlite")]
        assert raft.main(args + ["-o", str(tmp_path / "unfiltered"), "-c", str(tmp_path / "off.yaml")]) == 0
        assert raft.main(args + ["-o", str(tmp_path / "filtered")]) == 0
    assert not read_jsonl(tmp_path / "unfiltered" / "filtered_out.jsonl")
    assert quality.main(["-o", str(tmp_path / "unfiltered")]) == 0
    assert re.search(r"filtered \d+ answer: quote not in the oracle chunk", capsys.readouterr().out)
    for name in ("raft.jsonl", "filtered_out.jsonl"):
        assert (tmp_path / "unfiltered" / name).read_bytes() == (tmp_path / "filtered" / name).read_bytes()
    import datasets
    assert datasets.load_from_disk(str(tmp_path / "unfiltered")).to_list() == \
        read_jsonl(tmp_path / "unfiltered" / "raft.jsonl")
    assert "answer: quote not in the oracle chunk" in (tmp_path / "unfiltered" / "data_card.md").read_text()


def test_quality_alone_needs_a_finished_folder(tmp_path, capsys):
    assert quality.main(["-o", str(tmp_path)]) == 2
    assert "raft_run.json cannot be read" in capsys.readouterr().err
