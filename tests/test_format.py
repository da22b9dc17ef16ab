"""format.py as a library and as the reference command line."""
import json
import subprocess
import sys

import datasets
import pytest

import format as formats
from tests.conftest import ROOT

RECORDS = [{"id": f"seed_task_{i}", "type": "general", "question": f"Q{i}?",
            "context": {"title": [["placeholder_title"] * 2], "sentences": [[f"doc a{i}", f"doc b{i}"]]},
            "oracle_context": f"doc a{i}", "cot_answer": f"because ##begin_quote## doc a{i} ##end_quote## <ANSWER>: A{i}",
            "instruction": f"<DOCUMENT>doc a{i}</DOCUMENT>\n<DOCUMENT>doc b{i}</DOCUMENT>\nQ{i}?",
            "source": "x.md", "oracle_present": True, "quotes_verified": True, "oracle_rank": i + 1} for i in range(3)]


def test_completion_and_chat_carry_the_documents_not_just_the_question():
    completion = formats.to_format(RECORDS[0], "completion")
    assert completion == {"prompt": RECORDS[0]["instruction"], "completion": RECORDS[0]["cot_answer"]}
    chat = formats.to_format(RECORDS[0], "chat", system_prompt="Be brief.")
    assert chat["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": RECORDS[0]["instruction"]},
                                {"role": "assistant", "content": RECORDS[0]["cot_answer"]}]
    assert [m["role"] for m in formats.to_format(RECORDS[0], "chat")["messages"]] == ["user", "assistant"]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "format.py"), *args], capture_output=True, text=True)


def test_cli_from_arrow_to_chat_jsonl_and_parquet(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    done = run_cli("--input", str(tmp_path / "ds"), "--input-type", "arrow", "--output", str(tmp_path / "chat"),
                   "--output-format", "chat", "--output-type", "jsonl", "--output-chat-system-prompt", "Sys.")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in open(tmp_path / "chat.jsonl")]
    assert [r["messages"][0]["content"] for r in rows] == ["Sys."] * 3
    assert rows[2]["messages"][1]["content"].startswith("<DOCUMENT>doc a2</DOCUMENT>")
    done = run_cli("--input", str(tmp_path / "chat.jsonl"), "--input-type", "jsonl", "--output", str(tmp_path / "c.parquet"),
                   "--output-format", "hf", "--output-type", "parquet")
    assert done.returncode != 0 and "missing field(s) instruction, cot_answer" in done.stderr   # chat rows are not RAFT records
    (tmp_path / "raft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    done = run_cli("--input", str(tmp_path / "raft.jsonl"), "--input-type", "jsonl", "--output", str(tmp_path / "c"),
                   "--output-format", "completion", "--output-type", "parquet")
    assert done.returncode == 0, done.stderr
    table = datasets.Dataset.from_parquet(str(tmp_path / "c.parquet")).to_list()
    assert table == [{"prompt": r["instruction"], "completion": r["cot_answer"]} for r in RECORDS]


@pytest.mark.parametrize("content, message", [(None, "not found"), ("", "is empty"),
                                              ("{not json\n", "line 1: not valid JSON")])
def test_cli_bad_input_is_one_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    done = run_cli("--input", str(path), "--input-type", "jsonl", "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_arrow_records_without_the_raft_fields_are_refused(tmp_path):
    datasets.Dataset.from_list([{"messages": "a chat row"}]).save_to_disk(str(tmp_path / "chat_ds"))
    done = run_cli("--input", str(tmp_path / "chat_ds"), "--input-type", "arrow", "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "record 1: missing field(s) instruction, cot_answer" in done.stderr


def test_record_sink_writes_the_same_records_as_lines_and_as_the_dataset(tmp_path):
    refusal = {**RECORDS[0], "id": "refusal_task_3", "quotes_verified": None, "oracle_rank": None}   # nulls it takes
    sink = formats.RecordSink(tmp_path / "stream.jsonl", tmp_path / "ds")
    for record in RECORDS + [refusal]:
        sink.add(record)
    sink.close()
    lines = [json.loads(line) for line in open(tmp_path / "stream.jsonl", encoding="utf-8")]
    assert lines == RECORDS + [refusal]
    assert datasets.load_from_disk(str(tmp_path / "ds")).to_list() == lines


def test_record_sink_raises_the_writers_failure_in_the_caller(tmp_path):
    (tmp_path / "full.jsonl").symlink_to("/dev/full")                 # every write: ENOSPC
    sink = formats.RecordSink(tmp_path / "full.jsonl", tmp_path / "ds")
    with pytest.raises(OSError, match="No space left"):
        for _ in range(3 * formats.BATCH):
            sink.add(RECORDS[0])
        sink.close()
