"""finetune/embeddings.py: the retriever's embedding model tuned on pairs cut from the documents and on RAFT
question/chunk pairs, then used as embedding_model."""
import collections
import json
import random
import re
import subprocess
import sys

import finetune.embeddings as embeddings
from finetune.embeddings import checked_chunks, distinct_chunk_batches
from finetune.pairs import KEEP_SENTENCE, Pair, document_pairs, split_by_chunk
from documents import Chunk
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
        f"error: {data} holds 6 query/passage pairs: at least 10 are needed"


def test_document_pairs_cut_each_sentence_out_of_its_chunk():
    chunks = [f"Short one. The pump number {i} moves water from the lower tank to the roof. It was serviced in "
              f"spring of year {2000 + i} by the night crew." for i in range(200)]
    pairs = document_pairs(chunks, random.Random(0))
    assert len(pairs) == 400                                  # two sentences a chunk; "Short one." is too short
    assert {p.chunk for p in pairs} == set(chunks)
    kept = [p for p in pairs if p.passage == p.chunk]
    assert 0.05 < len(kept) / len(pairs) < 0.15 and abs(len(kept) / len(pairs) - KEEP_SENTENCE) < 0.05
    for pair in pairs:
        assert pair.query in pair.chunk
        assert pair.passage == pair.chunk or (pair.query not in pair.passage and "Short one." in pair.passage)


def test_no_batch_holds_two_pairs_of_one_chunk():
    rng = random.Random(1)
    chunk_of = [rng.randrange(40) for _ in range(500)] + [99] * 12        # one chunk with many pairs
    for seed in range(3):
        batches = distinct_chunk_batches(chunk_of, 16, seed)
        assert all(len({chunk_of[i] for i in batch}) == len(batch) > 1 for batch in batches)
        used = collections.Counter(i for batch in batches for i in batch)
        left_out = {chunk_of[i] for i in range(len(chunk_of)) if i not in used}
        assert max(used.values()) == 1 and len(left_out) <= 1        # only one chunk's last pairs, with no partner
        assert sum(99 in {chunk_of[i] for i in batch} for batch in batches) >= 11     # spread, not bunched
    assert distinct_chunk_batches(chunk_of, 16, 0) != distinct_chunk_batches(chunk_of, 16, 1)   # dealt anew


def test_the_held_out_check_ranks_its_own_chunks_among_a_bounded_number(monkeypatch):
    chunks = [f"chunk {i}" for i in range(500)]
    held_out = [Pair(f"q{i}", chunks[i * 7], chunks[i * 7]) for i in range(30)]
    monkeypatch.setattr(embeddings, "MAX_CHECKED_CHUNKS", 100)
    checked = checked_chunks(held_out, chunks, random.Random(0))
    assert len(checked) == len(set(checked)) == 100 and {p.chunk for p in held_out} <= set(checked)
    monkeypatch.setattr(embeddings, "MAX_CHECKED_CHUNKS", 10_000)
    assert sorted(checked_chunks(held_out, chunks, random.Random(0))) == sorted(chunks)


def write_documents(folder, n=16):
    """Small made-up documents, one topic each, a few sentences long."""
    folder.mkdir()
    for i in range(n):
        (folder / f"device{i}.md").write_text(
            f"# Device {i}\n\nThe device {i} cools the server room number {i} during the summer months. Its fan "
            f"turns at {1000 + 37 * i} revolutions per minute when the room is hot. The filter of device {i} is "
            f"replaced every {i + 2} weeks by the facilities team.\n")
    return folder


def test_tuning_on_the_documents_and_raft_pairs_together(tmp_path):
    docs = write_documents(tmp_path / "docs")
    data = write_raft(tmp_path / "raft.jsonl")
    out = tmp_path / "minilm-docs"
    done = subprocess.run([sys.executable, SCRIPT, "--documents", str(docs), "--data_path", str(data),
                           "--output", str(out), "--epochs", "1", "--batch_size", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = re.search(r"on (\d+) query/passage pairs .* held-out accuracy@1 among (\d+) chunks: ([\d.]+) before, "
                        r"([\d.]+) after \((\d+) queries\)", done.stdout)
    assert summary, done.stdout[-1000:]
    trained, chunks, held_out = int(summary.group(1)), int(summary.group(2)), int(summary.group(5))
    assert trained + held_out == 16 * 3 + 48 and chunks == 16 + 24          # 3 sentences a document, 48 questions
    chunks = [Chunk((docs / f"device{i}.md").read_text(), f"device{i}.md") for i in range(16)]
    dense = build_retrievers(chunks, ["dense"], embedding_model=str(out))["dense"]
    assert dense.rank(["How often is the filter of device 5 replaced?"], 1)[0] == [5]


def test_a_missing_documents_folder_or_no_source_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--documents", str(tmp_path / "nowhere"), "--output",
                           str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and str(tmp_path / "nowhere") in done.stderr
    done = subprocess.run([sys.executable, SCRIPT, "--output", str(tmp_path / "m")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "give --documents, --data_path or both" in done.stderr


def test_the_held_out_pairs_are_whole_chunks_never_seen_in_training():
    rng = random.Random(0)
    chunks = [" ".join(f"Sentence {c}.{s} says the value of item {c} is {s * 7} units." for s in range(6))
              for c in range(40)]
    pairs = document_pairs(chunks, rng)
    held_out, train = split_by_chunk(pairs, rng)
    assert 0.09 <= len(held_out) / len(pairs) <= 0.2 and len(held_out) + len(train) == len(pairs)
    assert not {p.chunk for p in held_out} & {p.chunk for p in train}
    assert not any(h.query in t.passage for h in held_out for t in train)
