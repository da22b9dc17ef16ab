"""The second retrieval stage (rerank.py): the mix of scores by hand, a tiny CrossEncoder saved here and loaded by
path, and the LLM reranker against the scripted server (order, cache, an unreadable grade, listwise)."""
import re

import pytest

from config import EVAL_SCHEMA, load_config
from documents import Chunk
from llm_client import ChatClient
from rerank import CrossEncoderScorer, LLMScorer, Reranked, mixed_order, with_reranker
from retrieval import build_retriever
from tests.conftest import ROOT
from tests.fake_server import FakeOpenAI, Reply

CFG = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)
CHUNKS = [Chunk(text, f"{n}.md") for n, text in enumerate([
    "The vLLM server listens on port 8000 by default.",
    "Port numbers below 1024 need root on Linux; the server port is set with --port.",
    "Llama 3 was released in April 2024.",
    "Prompt Guard labels text as benign, injection or jailbreak."])]


def test_mixed_order_by_hand():
    first = [7, 3, 9]                         # the first stage's order
    assert mixed_order(first, [0.0, 0.0, 1.0], weight=1.0) == [9, 7, 3]      # the reranker alone
    assert mixed_order(first, [0.0, 0.0, 1.0], weight=0.0) == [7, 3, 9]      # the first stage alone
    # at 0.5: 9 gets 0.5 + 0.5 x 61/63; 7 gets 0.5 x 1: the reread third wins
    assert mixed_order(first, [0.0, 0.0, 1.0], weight=0.5) == [9, 7, 3]
    assert mixed_order(first, [1.0, 1.0, 1.0], weight=0.9) == [7, 3, 9]      # equal scores: the first order stays


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A 2-layer BERT cross-encoder with the packaged MiniLM's tokenizer, saved as a CrossEncoder folder."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from retrieval import embedding_model_path
    folder = tmp_path_factory.mktemp("cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(embedding_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)
                                  ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CrossEncoder(str(folder), device="cpu").save(str(folder))
    return folder


def test_a_cross_encoder_loaded_by_path_reorders_the_candidates_by_its_scores(tiny_cross_encoder):
    scorer = CrossEncoderScorer(str(tiny_cross_encoder))
    question = "Which port does the vLLM server listen on?"
    scores = scorer.scores(question, [c.text for c in CHUNKS])
    assert len(scores) == 4 and len(set(scores)) == 4
    ranker = with_reranker(build_retriever(CHUNKS, "bm25"), CHUNKS,
                           {**CFG, "reranker": str(tiny_cross_encoder), "rerank_depth": 4, "rerank_weight": 1.0}, None)
    assert ranker.rank([question], 4)[0] == sorted(range(4), key=lambda i: -scores[i])


def test_an_unknown_cross_encoder_is_a_one_line_error():
    from errors import InputError
    with pytest.raises(InputError, match="reranker 'no/such-model' could not be loaded"):
        CrossEncoderScorer("no/such-model")


def grade(body, n):
    """A scripted grader: 10 for the passage that names vLLM's port, 3 for a passage about ports, an unreadable
    reply for Prompt Guard, 0 otherwise."""
    passage = body["messages"][-1]["content"].split("Passage: ", 1)[1]
    if "vLLM" in passage:
        return Reply(content="10")
    if "Port" in passage:
        return Reply(content="Grade: 3 of 10")
    if "Prompt Guard" in passage:
        return Reply(content="I cannot grade this.")
    return Reply(content="0")


def test_the_llm_reranker_grades_each_candidate_caches_and_counts_what_it_cannot_read(tmp_path):
    with FakeOpenAI(models=("judge",)) as judge:
        judge.script = grade
        client = ChatClient([judge.url], model="judge", cache_path=str(tmp_path / "rerank.sqlite"), max_retries=0)
        scorer = LLMScorer(client, "pointwise", CFG["rerank_prompt"], {"temperature": 0.0, "max_tokens": 8})
        first = build_retriever(CHUNKS, "bm25")
        reranked = Reranked(first, scorer, CHUNKS, depth=4, weight=1.0)
        question = "What is the Llama 3 release date?"        # bm25 puts the Llama chunk first
        assert first.rank([question], 4)[0][0] == 2
        order = reranked.rank([question], 4)[0]
        assert order[:2] == [0, 1] and set(order[2:]) == {2, 3}
        assert len(judge.requests) == 4 and scorer.unreadable == 1
        assert reranked.rank([question], 4)[0] == order and len(judge.requests) == 4     # from the cache
        client.close()


def test_the_listwise_llm_reranker_takes_the_numbers_in_order():
    with FakeOpenAI(models=("judge",)) as judge:
        judge.script = lambda body, n: Reply(content="3, 1, 3")          # the 2nd and 4th are never named
        client = ChatClient([judge.url], model="judge", max_retries=0)
        scorer = LLMScorer(client, "listwise", CFG["rerank_list_prompt"], {"temperature": 0.0, "max_tokens": 16})
        assert scorer.scores("q?", ["a", "b", "c", "d"]) == [3.0, 2.0, 4.0, 1.0]   # order 3, 1, then 2, 4
        assert scorer.unreadable == 1 and len(judge.requests) == 1
        passages = judge.requests[0]["messages"][-1]["content"]
        assert re.search(r"\[1\] a\n\[2\] b\n\[3\] c\n\[4\] d", passages)
        client.close()


def test_an_llm_reranker_needs_a_server():
    from errors import InputError
    with pytest.raises(InputError, match="--rerank_url"):
        with_reranker(build_retriever(CHUNKS, "bm25"), CHUNKS, {**CFG, "reranker": "llm"}, None)


def test_a_cross_encoder_trained_on_the_documents_loads_as_a_reranker(tmp_path, capsys):
    """finetune/reranker.py on a small corpus, one epoch: it writes a CrossEncoder folder the reranker loads."""
    from finetune import reranker
    from tests.conftest import write_corpus
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=2)
    assert reranker.main(["--documents", str(corpus), "--output", str(tmp_path / "model"), "--negatives", "1",
                          "--epochs", "1", "--check_depth", "3"]) == 0
    out = capsys.readouterr().out
    hybrid, reranked = map(float, re.search(r"held-out queries .* (\d\.\d\d) in its order, (\d\.\d\d) reranked",
                                            out).groups())
    advice = "then set reranker to it" if reranked > hybrid else "keep reranker: none"     # by what it measured
    assert advice in out
    scorer = CrossEncoderScorer(str(tmp_path / "model"))
    assert len(scorer.scores("What is the batch size of model 0?", [c.text for c in CHUNKS])) == 4


def shared_words_first(body, n):
    """A scripted listwise reranker: the passages' numbers, most words shared with the question first."""
    prompt = body["messages"][-1]["content"]
    question = set(re.findall(r"\w+", prompt.split("Question: ", 1)[1].split("\n", 1)[0].lower()))
    passages = re.findall(r"^\[(\d+)\] (.*)$", prompt, flags=re.M)
    ranked = sorted(passages, key=lambda p: -len(question & set(re.findall(r"\w+", p[1].lower()))))
    return Reply(content=", ".join(number for number, _ in ranked))


def test_the_rerank_benchmark_measures_the_llm_reranker_on_every_question_set_and_reruns_from_its_cache(tmp_path,
                                                                                                     capsys):
    """bench/rerank.py --llm against the scripted server: one listwise request per question of every set, a row per
    set, the cost; the second run reads every reply from its cache."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("rerank_bench", ROOT / "bench" / "rerank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dev = [i for i in json.loads((ROOT / "eval" / "dev_questions.json").read_text()) if i["support"]]
    questions = len(dev) + len(json.loads((ROOT / "eval_llama.json").read_text()))
    outputs = []
    with FakeOpenAI(models=("judge",)) as judge:
        judge.script = shared_words_first
        for _ in range(2):
            assert bench.main(["--llm", judge.url, "--llm_mode", "listwise", "--llm_depth", "10",
                               "--cache", str(tmp_path / "rerank.sqlite")]) == 0
            outputs.append(capsys.readouterr().out)
    assert len(judge.requests) == questions                            # the second run asked nothing
    assert all(len(re.findall(r"^\[\d+\] ", r["messages"][-1]["content"], flags=re.M)) == 10 for r in judge.requests)
    for out in outputs:
        rows = re.findall(r"^(dev: \w+|plain \(eval_llama.json\)) +\+ llm listwise((?: +[01]\.\d\d){4})$", out, re.M)
        assert len(rows) == len({i["kind"] for i in dev}) + 1
        assert all(row == sorted(row) for row in ([float(v) for v in r.split()] for _, r in rows))   # @1 <= ... @7
        assert re.search(r"llm listwise +its top 10: +\d+\.\d ms more", out)
    assert "0 replies unreadable" in outputs[0] and f"{questions} replies came from the cache" in outputs[1]
