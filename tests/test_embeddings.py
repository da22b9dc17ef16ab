"""finetune/embeddings.py: the retriever's embedding model tuned on RAFT question/chunk pairs, then used as
embedding_model."""
import json
import re
import subprocess
import sys

from raft_utils import Chunk
from retrieval import build_retrievers
from tests.conftest import ROOT

SCRIPT = str(ROOT / "finetune" / "embeddings.py")


def write_raft(path, n_chunks=24):
    """RAFT records over distinct made-up chunks: each question names its chunk's subject in other words."""
    records = []
    for i in range(n_chunks):
        chunk = (f"The gadget number {i} is sold by the harbour shop and costs {i * 13} coins. It was designed by "
                 f"engineer {i} and runs on batteries of type {i % 5}.")
        for q, question in enumerate((f"How much does gadget {i} cost?", f"Who designed the gadget {i}?")):
            records.append({"id": f"seed_task_{len(records)}", "question": question, "oracle_context": chunk,
                            "instruction": f"<DOCUMENT>{chunk}</DOCUMENT>\n{question}",
                            "cot_answer": f"##begin_quote## {chunk} ##end_quote## <ANSWER>: {i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tuning_on_raft_pairs_gives_a_model_the_retriever_uses(tmp_path):
    data = write_raft(tmp_path / "raft.jsonl")
    out = tmp_path / "minilm-raft"
    done = subprocess.run([sys.executable, SCRIPT, "--data_path", str(data), "--output", str(out), "--epochs", "1",
                           "--batch_size", "8"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = re.search(r"held-out accuracy@1 among (\d+) chunks: ([\d.]+) before, ([\d.]+) after", done.stdout)
    assert summary and summary.group(1) == "24", done.stdout[-1000:]
    chunks = [Chunk(json.loads(line)["oracle_context"], f"c{i}.md") for i, line in enumerate(open(data)) if i % 2 == 0]
    dense = build_retrievers(chunks, ["dense"], embedding_model=str(out))["dense"]
    assert dense.rank(["How much does gadget 7 cost?"], 1)[0] == [7]


def test_too_little_data_is_one_line(tmp_path):
    data = write_raft(tmp_path / "raft.jsonl", n_chunks=3)
    done = subprocess.run([sys.executable, SCRIPT, "--data_path", str(data), "--output", str(tmp_path / "m")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == \
        f"error: {data} holds 6 question/chunk pairs: at least 10 are needed"
