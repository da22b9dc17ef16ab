"""raft_eval.py end to end against scripted servers over real HTTP: exact metric values, outputs, resume, bad input."""
import json
import re

import pytest

import raft_eval
from tests.conftest import write_corpus
from tests.fake_server import FakeOpenAI, Reply
from tests.test_metrics import REFUSAL

# gold answers share no word with each other or with the refusal answer, so every ROUGE value is known
GOLD = {"What is the first code?": "42 units", "What animal is it?": "blue whale",
        "Which lanterns are lit?": "seven lanterns", "Who guards the gate?": "amber tiger"}
# the student's answers with retrieved documents: right, right in more words, a refusal, one the judge cannot grade
STUDENT_RAG = {"What is the first code?": "42 units", "What animal is it?": "the blue whale swims",
               "Which lanterns are lit?": REFUSAL, "Who guards the gate?": "a stone lion"}


def question_in(body) -> str:
    return body["messages"][-1]["content"].strip().splitlines()[-1]


def student(body, n):
    if "<DOCUMENT>" in body["messages"][-1]["content"]:
        return Reply(content=f"Reasoning. ##begin_quote## x ##end_quote##\n<ANSWER>: {STUDENT_RAG[question_in(body)]}")
    return Reply(content="I don't know.")


def base(body, n):
    return Reply(content="It is an amber tiger, I believe.")


def judge(body, n):
    prompt = body["messages"][-1]["content"]
    if prompt.startswith("Documents:"):
        return Reply(content=claims_of(prompt))
    if "\nPassage: " in prompt:                   # the llm reranker: the gold answer's passage first
        passage = prompt.split("\nPassage: ", 1)[1]
        return Reply(content="9" if any(word in passage for word in ("42", "whale", "lanterns", "tiger")) else "1")
    question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
    answer = prompt.split("Answer to grade: ", 1)[1].split("\n", 1)[0]
    if answer == "a stone lion":
        return Reply(content="Hard to say.")
    return Reply(content="YES" if GOLD[question] in answer else "NO")


def claims_of(prompt: str) -> str:
    """The groundedness judge: each sentence of the answer is a claim, supported when every word of it is in the
    documents."""
    documents, answer = prompt.split("\nAnswer: ", 1)
    words = set(re.findall(r"\w+", documents.lower()))
    sentences = [s for s in re.split(r"(?<=\.)\s+", answer.strip()) if s]
    return "\n".join(("SUPPORTED" if set(re.findall(r"\w+", s.lower())) <= words else "UNSUPPORTED") + f": {s}"
                     for s in sentences) or "NONE"


@pytest.fixture
def servers():
    with FakeOpenAI(models=("student",)) as s, FakeOpenAI(models=("base",)) as b, FakeOpenAI(models=("judge",)) as j:
        s.script, b.script, j.script = student, base, judge
        yield s, b, j


@pytest.fixture
def eval_setup(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=2)
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"question": q, "answer": a} for q, a in GOLD.items()]))
    return corpus, eval_file, tmp_path / "out"


def run_eval(servers, eval_setup, *extra):
    s, b, j = servers
    corpus, eval_file, out = eval_setup
    return raft_eval.main(["-u", s.url, "-j", j.url, "--baseline", f"base={b.url}", "-d", str(corpus),
                           "--eval_file", str(eval_file), "-o", str(out), "--retriever", "bm25", *extra])


def test_full_run_exact_metrics_and_outputs(servers, eval_setup):
    assert run_eval(servers, eval_setup, "-r", "2", "3") == 0
    out = eval_setup[2]
    result = json.loads((out / "metrics.json").read_text())
    assert list(result["systems"]) == ["student", "base"]
    assert list(result["systems"]["student"]) == ["no_rag", "rag_top2", "rag_top3"]

    rag = result["systems"]["student"]["rag_top2"]
    assert rag["judge_yes"] == 2 and rag["judge_unparseable"] == 1 and rag["refusals"] == 1
    # precision: both answers that neither declined nor left the judge unsure were judged YES
    assert rag["judge_score"] == 0.5 and rag["refusal_rate"] == 0.25 and rag["precision"] == 1.0
    low, high = rag["intervals"]["judge_score"]
    assert 0.0 <= low < 0.5 < high <= 1.0 and rag["intervals"]["precision"] == [1.0, 1.0]
    assert rag["exact_match"] == 0.25
    # ROUGE-1: 1, 2/3 (the blue whale swims vs blue whale), 0, 0; ROUGE-2: 1, 1/2, 0, 0
    assert rag["rouge1"] == pytest.approx((1 + 2 / 3) / 4) and rag["rouge2"] == pytest.approx(1.5 / 4)
    assert rag["rougeL"] == pytest.approx((1 + 2 / 3) / 4)

    # token F1: 1, 0.8 (blue whale of "the blue whale swims": precision 2/3, recall 1), 0, 0
    assert rag["token_f1"] == pytest.approx(0.45) and rag["intervals"]["token_f1"][0] <= 0.45
    # every top-2 reply quotes "x", a word no chunk has; without documents nobody quotes
    assert rag["quote_support"] == 0.0 and rag["answers_with_quotes"] == 4
    assert 0.0 < rag["similarity"] < 1.0 and rag["answers_compared"] == 4
    # the groundedness judge read the 3 answers that do not decline, each a single claim
    assert rag["answers_with_claims"] == 3 and rag["groundedness"] in (0.0, 1 / 3, 2 / 3, 1.0)

    no_rag = result["systems"]["student"]["no_rag"]
    assert no_rag["refusal_rate"] == 1.0 and no_rag["judge_score"] == 0.0 and no_rag["precision"] is None
    assert no_rag["quote_support"] is None and no_rag["answers_with_quotes"] == 0 and no_rag["groundedness"] is None

    base_rag = result["systems"]["base"]["rag_top3"]   # the whole reply counts: no <ANSWER>: in it
    assert base_rag["judge_score"] == 0.25 and base_rag["refusal_rate"] == 0.0 and base_rag["precision"] == 0.25
    assert base_rag["exact_match"] == 0.0 and base_rag["rouge1"] == pytest.approx(2 * (2 / 7) / (2 / 7 + 1) / 4)

    assert set(result["retrieval"]) == {"bm25", "dense", "hybrid"}
    assert result["settings"]["chunks"] == 4       # so recall@5 and @7 are left out
    assert list(result["retrieval"]["bm25"]) == ["recall@1", "recall@2", "recall@3"]
    assert result["settings"]["judge_model"] == "judge" and "127.0.0.1" in result["settings"]["endpoints"]["student"]

    log = [json.loads(line) for line in open(out / "questions.jsonl")]
    assert [row["question"] for row in log] == list(GOLD)
    row = log[1]
    assert row["answer"] == "blue whale" and len(row["retrieved"]) == 3
    assert all(r["source"].endswith(".md") for r in row["retrieved"])
    entry = row["systems"]["student"]["rag_top2"]
    assert entry["answer"] == "the blue whale swims" and entry["verdict"] is True and entry["judge_reply"] == "YES"
    assert entry["token_f1"] == pytest.approx(0.8) and len(entry["claims"]) == 1
    assert entry["claims"][0]["claim"] == "the blue whale swims"
    assert log[0]["systems"]["student"]["rag_top2"]["similarity"] == pytest.approx(1.0, abs=1e-5)   # "42 units"

    text = (out / "report.md").read_text()
    assert f"| student | RAG top-2 | 0.500 [{low:.2f}, {high:.2f}] | 1.000 [1.00, 1.00] | 0.250 [" in text
    # the judge of this test is right on every control answer: no warning, and the rates at the top of the report
    calibration = result["judge_calibration"]
    assert calibration["true_positive_rate"] == 1.0 and calibration["true_negative_rate"] == 1.0
    assert calibration["right_controls"] == 4 and calibration["wrong_controls"] == 8 and not calibration["warnings"]
    # the hard controls: "42 units" with a digit changed (NO), and every gold answer with a fabricated sentence
    assert calibration["near_miss_leniency"]["total"] == 1 and calibration["near_miss_leniency"]["count"] == 0
    assert calibration["addition_leniency"]["total"] == 4 and calibration["addition_leniency"]["count"] == 0
    assert calibration["hard_controls_pass"] and "can be read as accuracy" in text
    assert text.index("## Can the judge be trusted?") < text.index("## Systems")
    assert "true-negative rate (NO to another question's gold answer or to the refusal): 8 of 8, 1.00 [0.68, 1.00]" in text
    comparisons = [c for c in result["comparisons"] if c["condition"] == "rag_top2"]
    assert len(comparisons) == 1 and comparisons[0]["baseline"] == "base"
    # top-2: student right on 2 (code, whale), base right on the gate only -> +0.25, 2 vs 1 discordant
    assert comparisons[0]["difference"] == 0.25 and comparisons[0]["only_first_right"] == 2
    assert "student vs base at RAG top-2: +25.0 points [" in text and "not significant at 5%" in text
    # with top-2 the systems disagree on all but the lanterns (both NO); without RAG only on the gate (base YES)
    assert "### RAG top-2: 3 question(s)" in text and "### no RAG: 1 question(s)" in text
    assert "Which lanterns are lit?" not in text
    assert "- student (unparseable): a stone lion" in text and "- base (YES): It is an amber tiger" in text
    for name in ("judge_score.png", "refusals.png", "precision.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_llm_reranker_rereads_the_top_candidates_with_the_judge(servers, eval_setup):
    assert run_eval(servers, eval_setup, "-r", "2", "--reranker", "llm") == 0
    result = json.loads((eval_setup[2] / "metrics.json").read_text())
    assert list(result["retrieval"])[0] == "bm25+rerank" and "bm25" in result["retrieval"]
    graded = [b for b in servers[2].requests if "\nPassage: " in b["messages"][-1]["content"]]
    assert len(graded) == 4 * 4                  # 4 questions x the 4 chunks (rerank_depth 20, cut to the corpus)
    assert (eval_setup[2] / "cache" / "reranker.sqlite").exists()


def test_second_run_resumes_from_the_cache(servers, eval_setup):
    assert run_eval(servers, eval_setup, "-r", "2") == 0
    sent = [len(server.requests) for server in servers]
    # 4 questions x (no RAG + top-2), per system; the judge: all 16 answers, 3 control answers per question and a
    # near miss of "42 units", then the groundedness of the 7 top-2 answers that do not decline and of the 4 gold
    # answers with a fabricated sentence added
    assert sent == [8, 8, 16 + 12 + 1 + 7 + 4]
    assert run_eval(servers, eval_setup, "-r", "2") == 0
    assert [len(server.requests) for server in servers] == sent


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize("content, message", [
    (None, "not found: pass --eval_file"), ("[{\"question\": ", "is not valid JSON"),
    ("[]", "must be a non-empty JSON list"), ('{"question": "q", "answer": "a"}', "must be a non-empty JSON list"),
    ('[{"question": "q", "answer": "a"}, {"question": "q2"}]', "item 2: needs non-empty 'question' and 'answer'")])
def test_bad_eval_file(servers, eval_setup, capsys, content, message):
    eval_file = eval_setup[1]
    eval_file.unlink()
    if content is not None:
        eval_file.write_text(content)
    assert run_eval(servers, eval_setup) == 2
    line = one_line_error(capsys)
    assert message in line and str(eval_file) in line
    assert not servers[0].requests


def test_empty_corpus(servers, eval_setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_eval(servers, eval_setup, "-d", str(empty)) == 2
    assert f"no documents could be read from {empty}" in one_line_error(capsys)


def test_bad_baseline_spec(servers, eval_setup, capsys):
    assert run_eval(servers, eval_setup, "--baseline", "base-at-localhost") == 2
    assert "write it as NAME=URL" in one_line_error(capsys)


def test_unreachable_model(servers, eval_setup, capsys):
    s, b, j = servers
    corpus, eval_file, out = eval_setup
    assert raft_eval.main(["-u", "http://127.0.0.1:9/v1", "-j", j.url, "-d", str(corpus),
                           "--eval_file", str(eval_file), "-o", str(out)]) == 2
    assert "error: model under test: cannot reach http://127.0.0.1:9" in one_line_error(capsys)


def test_unreachable_judge_is_found_before_any_work(servers, eval_setup, capsys):
    s, b, j = servers
    corpus, eval_file, out = eval_setup
    assert raft_eval.main(["-u", s.url, "-d", str(corpus), "--eval_file", str(eval_file), "-o", str(out),
                           "-j", "http://127.0.0.1:9/v1"]) == 2
    assert "error: judge: cannot reach http://127.0.0.1:9" in one_line_error(capsys)
    assert not s.requests


def test_a_judge_failing_mid_run_keeps_the_answers(servers, eval_setup, capsys):
    s, b, j = servers
    corpus, eval_file, out = eval_setup
    args = ["-u", s.url, "-j", j.url, "-d", str(corpus), "--eval_file", str(eval_file), "-o", str(out), "-r", "2"]
    j.script = lambda body, n: Reply(status=401)              # e.g. its key expired during the run
    assert raft_eval.main(args) == 2
    line = one_line_error(capsys)
    assert "error: judge" not in line and "run again to resume" in line and "401" in line
    answered = len(s.requests)
    assert answered == 8
    j.script = judge
    assert raft_eval.main(args) == 0
    assert len(s.requests) == answered                        # the answers came from the cache


def test_topk_larger_than_the_corpus_is_clamped(servers, eval_setup, capsys):
    assert run_eval(servers, eval_setup, "-r", "2", "50") == 0
    assert "top-k 50 is more than the 4 chunks; using at most 4" in capsys.readouterr().err
    result = json.loads((eval_setup[2] / "metrics.json").read_text())
    assert list(result["systems"]["student"]) == ["no_rag", "rag_top2", "rag_top4"]


def test_draft_from_a_raft_dataset(tmp_path, capsys):
    records = [{"id": f"seed_task_{i}", "question": f"Question {i}?", "instruction": "docs",
                "cot_answer": f"Reasoning ##begin_quote## q ##end_quote##\n<ANSWER>: answer {i}"} for i in range(30)]
    records.append({"id": "refusal_task_30", "question": "Question 0?", "instruction": "docs",
                    "cot_answer": "<ANSWER>: " + REFUSAL})
    records.append({"id": "seed_task_31", "question": "No marker?", "instruction": "docs", "cot_answer": "no marker"})
    dataset = tmp_path / "raft.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))

    def draft(seed, out):
        assert raft_eval.main(["--draft_from", str(dataset), "--draft_size", "10", "--seed", str(seed),
                               "-o", str(out)]) == 0
        return json.loads((out / "eval_draft.json").read_text())

    first, again, other = draft(1, tmp_path / "a"), draft(1, tmp_path / "b"), draft(2, tmp_path / "c")
    assert len(first) == 10 and first == again and first != other
    assert all(item["answer"] == "answer " + item["question"].split()[1].rstrip("?") for item in first)
    assert "wrote 10 questions (of 32 records)" in capsys.readouterr().out
    everything = raft_eval.eval_draft(records, 100, 0)
    assert len(everything) == 30 and REFUSAL not in json.dumps(everything)   # refusals and unmarked answers left out
    assert raft_eval.read_eval_file(str(tmp_path / "a" / "eval_draft.json")) == first   # a valid eval file


def test_draft_from_a_missing_dataset(tmp_path, capsys):
    assert raft_eval.main(["--draft_from", str(tmp_path / "none.jsonl"), "-o", str(tmp_path)]) == 2
    assert "none.jsonl not found" in one_line_error(capsys)


def test_a_judge_that_agrees_with_everything_is_flagged(servers, eval_setup, capsys):
    servers[2].script = lambda body, n: Reply(content="YES")
    assert run_eval(servers, eval_setup, "-r", "2") == 0
    out = eval_setup[2]
    result = json.loads((out / "metrics.json").read_text())
    assert result["judge_calibration"]["true_negative_rate"] == 0.0
    warning = "the judge accepted 8 of 8 wrong answers: its scores are not reliable"
    assert result["judge_calibration"]["warnings"] == [
        warning, "the judge accepted 1 of 1 near misses (a gold answer with one number, month or name changed): it "
                 "is lenient on details",
        "the groundedness judge missed 4 of 4 fabricated sentences added to a gold answer: its groundedness scores "
        "overstate support"]
    assert f"WARNING: {warning}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.index(f"**WARNING: {warning}.**") < report.index("## Systems")
    controls = [json.loads(line) for line in open(out / "calibration.jsonl")]
    assert {c["kind"] for c in controls} == {"gold", "other", "refusal", "near_miss", "addition"}
    assert all(c["verdict"] for c in controls if c["kind"] != "addition") and "can be read as accuracy" not in report


def test_calibration_can_be_switched_off(servers, eval_setup, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(open(raft_eval.__file__.replace("raft_eval.py", "raft_eval_config.yaml")).read()
                      .replace("judge_calibration: true", "judge_calibration: false"))
    assert run_eval(servers, eval_setup, "-r", "2", "-c", str(config)) == 0
    assert len(servers[2].requests) == 16 + 7          # the answers' verdicts and groundedness, no control
    assert json.loads((eval_setup[2] / "metrics.json").read_text())["judge_calibration"] is None


def test_a_different_model_served_under_the_same_name_gets_new_answers(eval_setup, capsys):
    corpus, eval_file, out = eval_setup

    def evaluate(student_server, judge_server, *extra):
        return raft_eval.main(["-u", student_server.url, "-j", judge_server.url, "-d", str(corpus), "--eval_file",
                               str(eval_file), "-o", str(out), "--retriever", "bm25", "-r", "2", *extra])
    with FakeOpenAI(models=("judge",)) as j:
        j.script = judge
        with FakeOpenAI(models=("student",), model_info={"root": "/ckpt/epoch1"}) as first:
            first.script = student
            assert evaluate(first, j) == 0 and len(first.requests) == 8
        with FakeOpenAI(models=("student",), model_info={"root": "/ckpt/epoch1"}) as same:   # restarted, new port
            assert evaluate(same, j) == 0 and not same.requests
            assert "every answer of student came from the cache" in capsys.readouterr().out
        with FakeOpenAI(models=("student",), model_info={"root": "/ckpt/epoch2"}) as retrained:
            retrained.script = student
            assert evaluate(retrained, j) == 0 and len(retrained.requests) == 8
        with FakeOpenAI(models=("student",), model_info={"root": "/ckpt/epoch2"}) as relabelled:
            relabelled.script = student
            assert evaluate(relabelled, j, "--model_revision", "run-7") == 0 and len(relabelled.requests) == 8
        fingerprints = json.loads((out / "metrics.json").read_text())["settings"]["models"]
        assert fingerprints["model under test: student"]["revision"] == "run-7"
        assert fingerprints["model under test: student"]["servers"][0]["root"] == "/ckpt/epoch2"


def test_answers_cut_at_max_tokens_are_counted(servers, eval_setup):
    def cut_once(body, n):
        reply = student(body, n)
        if "<DOCUMENT>" in body["messages"][-1]["content"] and question_in(body) == "What animal is it?":
            reply.finish_reason = "length"
        return reply
    servers[0].script = cut_once
    assert run_eval(servers, eval_setup, "-r", "2") == 0
    result = json.loads((eval_setup[2] / "metrics.json").read_text())
    assert result["systems"]["student"]["rag_top2"]["truncated"] == 1
    assert result["systems"]["student"]["no_rag"]["truncated"] == 0
    log = [json.loads(line) for line in open(eval_setup[2] / "questions.jsonl")]
    assert log[1]["systems"]["student"]["rag_top2"]["truncated"] is True
    assert "| cut at max_tokens |" in (eval_setup[2] / "report.md").read_text()


def test_training_data_that_holds_eval_questions_is_reported(servers, eval_setup, tmp_path, capsys):
    train = tmp_path / "raft.jsonl"
    train.write_text("".join(json.dumps({"id": f"seed_task_{i}", "question": q, "instruction": "docs",
                                         "cot_answer": "<ANSWER>: x"}) + "\n"
                             for i, q in enumerate(["what is the FIRST code", "Something else?"])))
    assert run_eval(servers, eval_setup, "-r", "2", "--train_data", str(train)) == 0
    overlap = json.loads((eval_setup[2] / "metrics.json").read_text())["training_overlap"]
    assert overlap["found_in_training"] == 1 and overlap["examples"] == ["What is the first code?"]
    assert "WARNING: 1 of 4 eval questions are also in the training data" in capsys.readouterr().out


def test_the_draft_comes_with_training_data_that_leaves_it_out(tmp_path, capsys):
    chunks = [f"chunk {c} text" for c in range(6)]
    records = [{"id": f"seed_task_{i}", "question": f"Question {i}?", "instruction": "docs",
                "oracle_context": chunks[i % 6], "cot_answer": f"<ANSWER>: answer {i}"} for i in range(12)]
    records += [{"id": f"refusal_task_{i}", "question": f"Question {i}?", "instruction": "docs",
                 "oracle_context": chunks[i % 6], "cot_answer": "<ANSWER>: " + REFUSAL} for i in range(12)]
    dataset = tmp_path / "raft.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert raft_eval.main(["--draft_from", str(dataset), "--draft_size", "2", "-o", str(tmp_path / "d")]) == 0
    drafted = {item["question"] for item in json.loads((tmp_path / "d" / "eval_draft.json").read_text())}
    kept = [json.loads(line) for line in open(tmp_path / "d" / "raft_without_draft.jsonl")]
    drafted_chunks = {r["oracle_context"] for r in records if r["question"] in drafted}
    assert kept and not {r["question"] for r in kept} & drafted
    assert not {r["oracle_context"] for r in kept} & drafted_chunks
    assert len(kept) == len([r for r in records if r["oracle_context"] not in drafted_chunks])
    assert "Fine-tune on this file" in capsys.readouterr().out


def test_the_evaluation_searches_the_chunks_of_the_generation_run(servers, tmp_path, capsys):
    """raft.py with 400-character chunks, then raft_eval.py --raft_run: the same documents, cut the same way, with
    no --chunk_size or -d repeated by hand."""
    import raft
    from tests.fake_server import FakeOpenAI as Teacher
    corpus = write_corpus(tmp_path / "corpus", n_docs=2, paragraphs=2)
    with Teacher() as teacher:
        assert raft.main(["-u", teacher.url, "--data_dir", str(corpus), "--chunk_size", "400", "-t", "1",
                          "-o", str(tmp_path / "data")]) == 0
    generated = json.loads((tmp_path / "data" / "raft_run.json").read_text())["counts"]["chunks"]
    s, _, j = servers
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps([{"question": q, "answer": a} for q, a in GOLD.items()]))
    assert raft_eval.main(["-u", s.url, "-j", j.url, "--raft_run", str(tmp_path / "data"), "--eval_file",
                           str(eval_file), "-o", str(tmp_path / "out"), "--retriever", "bm25", "-r", "2"]) == 0
    settings = json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]
    assert settings["chunk_size"] == 400 and settings["chunks"] == generated > 4
    assert settings["sources_from"] == str(tmp_path / "data" / "raft_run.json")
    assert f"{generated} chunks of 400 characters" in capsys.readouterr().out
