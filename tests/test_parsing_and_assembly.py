"""Parsing teacher output and assembling RAFT records."""
import pytest

from documents import Chunk
from raft_utils import QA, Assembler, AssemblySettings, assemble, chunks_needed, parse_questions, quotes_verified
from text import final_answer


def test_questions_lose_numbering_bullets_quotes_and_headers():
    reply = ('Here are 4 questions:\n\n1. What is the context length of Llama 3?\n2) "Which tokenizer does Llama 3 use?"\n'
             '- How many parameters has the largest model?\n* **Who may use Llama commercially?**\nQ5: Is it free?\n'
             'Question 6: What is GQA?\n')
    assert parse_questions(reply) == [
        "What is the context length of Llama 3?", "Which tokenizer does Llama 3 use?",
        "How many parameters has the largest model?", "Who may use Llama commercially?", "Is it free?",
        "What is GQA?"]


def test_requests_without_question_marks_count_but_summaries_do_not():
    assert parse_questions("1. Explain grouped-query attention\n2. Describe the licence") == [
        "Explain grouped-query attention", "Describe the licence"]
    assert parse_questions("The document provides a detailed explanation of LoRA.") == []
    assert parse_questions("") == [] and parse_questions("Sure:\n\n") == []


def test_several_questions_on_one_line_are_split():
    assert parse_questions("What is LoRA? How does it save memory?   Why use rank 8?") == [
        "What is LoRA?", "How does it save memory?", "Why use rank 8?"]


def test_questions_that_point_at_the_document_are_dropped():
    assert parse_questions("1. What is the purpose of this document?\n2. According to the passage, what is GQA?\n"
                           "3. What is the context length of Llama 3?") == ["What is the context length of Llama 3?"]


@pytest.mark.parametrize("text, answer", [
    ("reasoning...\n<ANSWER>: 8K tokens", "8K tokens"),
    ("<ANSWER> : tiktoken\n", "tiktoken"),
    ("no marker here", None),
    ("<ANSWER>:   ", None),
    ("", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


ORACLE = "Llama 3 supports an 8K context length.\nIt doubles   the capacity of Llama 2."


@pytest.mark.parametrize("answer, verified", [
    ("##begin_quote## llama 3 supports an 8k context LENGTH. ##end_quote## <ANSWER>: 8K", True),
    ("##begin_quote##It doubles the capacity\nof Llama 2.##end_quote## and ##begin_quote## 8K context ##end_quote##", True),
    ('##begin_quote## "Llama 3 supports an 8K context length." ##end_quote##', True),
    ("##begin_quote## Llama 3 supports a 32K context length. ##end_quote##", False),
    ("##begin_quote## 8K context ##end_quote## ##begin_quote## made up ##end_quote##", False),
    ("##begin_quote## 8K context length never closed", False),
    ("No quotes at all. <ANSWER>: 8K", False),
])
def test_quotes_are_checked_against_the_oracle(answer, verified):
    assert quotes_verified(answer, ORACLE) is verified


CHUNKS = [Chunk(f"chunk number {i} " + "x" * 120, f"doc{i % 3}.md") for i in range(12)]
SETTINGS = AssemblySettings(num_distract_docs=4, oracle_probability=0.8, refusal_probability=0.05,
                            refusal_answer="Sorry, I don't know.")
QAS = [QA(i % 12, f"Question {i}?", f"why ##begin_quote## q ##end_quote## <ANSWER>: {i}", i % 2 == 0) for i in range(400)]


def test_records_follow_the_raft_format():
    records = assemble(QAS, CHUNKS, SETTINGS, seed=1)
    seeds = [r for r in records if r["id"].startswith("seed_task_")]
    assert len(seeds) == 400
    refusal = SETTINGS.refusal_answer
    assert [r["id"] for r in records] == [f"{'refusal' if r['cot_answer'] == refusal else 'seed'}_task_{n}"
                                          for n, r in enumerate(records)]
    for r in records:
        docs = r["context"]["sentences"][0]
        assert r["type"] == "general" and len(docs) == 5 and len(set(docs)) == 5
        assert r["context"]["title"] == [["placeholder_title"] * 5]
        assert r["instruction"] == "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + r["question"]
        assert (r["oracle_context"] in docs) is r["oracle_present"]
        assert r["source"] == next(c.source for c in CHUNKS if c.text == r["oracle_context"])


def test_oracle_and_refusal_rates_and_labels():
    records = assemble(QAS, CHUNKS, SETTINGS, seed=2)
    seeds = [r for r in records if r["id"].startswith("seed")]
    refusals = [r for r in records if r["id"].startswith("refusal")]
    oracle_rate = sum(r["oracle_present"] for r in seeds) / len(seeds)
    assert 0.72 < oracle_rate < 0.88                        # 0.8 expected; 400 draws
    assert 5 <= len(refusals) <= 40                         # 0.05 * 400 = 20 expected
    for r in refusals:
        assert r["cot_answer"] == "Sorry, I don't know." and not r["oracle_present"] and r["quotes_verified"] is None
    oracle_free = [r for r in seeds if not r["oracle_present"]]
    assert oracle_free and all("<ANSWER>:" in r["cot_answer"] for r in oracle_free)   # label stays the CoT answer
    assert [r["quotes_verified"] for r in seeds] == [qa.quotes_verified for qa in QAS]


def test_same_seed_same_records_other_seed_other_records():
    assert assemble(QAS, CHUNKS, SETTINGS, seed=3) == assemble(QAS, CHUNKS, SETTINGS, seed=3)
    assert assemble(QAS, CHUNKS, SETTINGS, seed=3) != assemble(QAS, CHUNKS, SETTINGS, seed=4)


def test_probability_extremes():
    always = AssemblySettings(4, 1.0, 0.0, "no")
    records = assemble(QAS[:50], CHUNKS, always, seed=0)
    assert len(records) == 50 and all(r["oracle_present"] for r in records)
    never = AssemblySettings(4, 0.0, 1.0, "no")
    records = assemble(QAS[:50], CHUNKS, never, seed=0)
    assert len(records) == 100 and not any(r["oracle_present"] for r in records)


def test_chunks_needed():
    assert chunks_needed(SETTINGS) == 6
    assert chunks_needed(AssemblySettings(4, 1.0, 0.0, "no")) == 5
    assert chunks_needed(AssemblySettings(0, 0.8, 0.0, "no")) == 2


class HugeCorpus:
    """Ten million chunks that exist only when read: assembly that touched every chunk, or built a list of all
    their indices, per question would take minutes here."""

    def __len__(self):
        return 10_000_000

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return Chunk(f"Chunk number {index} says something about llamas.", f"doc{index // 100}.md")


def test_assembly_costs_the_distractors_not_the_corpus():
    settings = AssemblySettings(4, 0.8, 0.5, "I do not know.")
    qas = [QA(i * 1000, f"Question {i}?", f"<ANSWER>: {i}", True) for i in range(50)]
    records = Assembler(HugeCorpus(), settings, seed=3).records(qas)
    for record in records:
        docs = record["context"]["sentences"][0]
        assert len(docs) == 5 and len(set(docs)) == 5
        oracle = record["oracle_context"]
        assert (oracle in docs) == record["oracle_present"]
    # windows: the same records whether assembled at once or in pieces
    assembler = Assembler(HugeCorpus(), settings, seed=3)
    assert assembler.records(qas[:20]) + assembler.records(qas[20:]) == records
