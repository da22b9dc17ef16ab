"""The demo's quick mode end to end (about 5 minutes): every artefact exists and is well-formed, the servers it
started are stopped, and a second run reuses every finished stage."""
import json
import os
import shutil
import socket
import subprocess

import pytest

from tests.conftest import LLAMA_SERVER, ROOT, free_port
from tests.test_raft_cli import check_record


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not LLAMA_SERVER.exists():
        pytest.fail("the llama.cpp server is not set up: run `make setup` first")
    folder = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "DEMO_DIR": str(folder), "DEMO_TEACHER_PORT": str(free_port()),
           "DEMO_STUDENT_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
    run = lambda: subprocess.run([str(ROOT / "scripts" / "demo.sh"), "--quick"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=1200)
    first = run()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    yield folder, env, first, run
    # The checkpoints and the two converted models are 2.4 GB: gone before the next module writes its own.
    shutil.rmtree(folder / "checkpoints")
    shutil.rmtree(folder / "raft-smollm2-hf")
    (folder / "raft-smollm2.gguf").unlink()


def test_quick_demo_writes_every_artefact(demo):
    folder, env, first, _ = demo
    records = [json.loads(line) for line in open(folder / "data" / "raft.jsonl")]
    assert len(records) >= 4
    for record in records:
        check_record(record)
    run = folder / "checkpoints" / "raft-smollm2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["steps"]) >= 1 and (run / "latest.json").exists() and (run / "loss.png").exists()
    # SmolLM2 read from its GGUF and trained with 2 FSDP ranks: a trained model's loss, far below the ln(49152) =
    # 10.8 of a random one (the dequantized weights arrived whole).
    assert 0 < metrics["steps"][0]["train_loss"] < 10

    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = folder / "raft-smollm2-hf"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is RAFT?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] == prompt["input_ids"].shape[1] + 3
    assert (folder / "raft-smollm2.gguf").read_bytes()[:4] == b"GGUF"

    result = json.loads((folder / "eval" / "metrics.json").read_text())
    assert set(result["systems"]) == {"raft-smollm2", "smollm2-135m-instruct"}
    for conditions in result["systems"].values():
        assert list(conditions) == ["no_rag", "rag_top2"]
        assert all(m["questions"] == 3 and m["failed_requests"] == 0 for m in conditions.values())
    assert result["settings"]["judge_model"] == "smollm2-135m-instruct"
    assert "| raft-smollm2 | RAG top-2 |" in (folder / "eval" / "report.md").read_text()
    for plot in ("judge_score.png", "refusals.png", "precision.png"):
        assert (folder / "eval" / plot).read_bytes()[:4] == b"\x89PNG"

    assert "chat.py --model_path" in first.stdout and "--web" in first.stdout and "report.md" in first.stdout
    assert not port_open(int(env["DEMO_TEACHER_PORT"])) and not port_open(int(env["DEMO_STUDENT_PORT"]))


def test_a_second_run_reuses_every_stage(demo):
    folder, env, _, run = demo
    before = (folder / "eval" / "metrics.json").read_bytes()
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": reused") == 4                 # generate, finetune, convert, evaluate
    assert (folder / "eval" / "metrics.json").read_bytes() == before
    assert not port_open(int(env["DEMO_TEACHER_PORT"])) and not port_open(int(env["DEMO_STUDENT_PORT"]))
