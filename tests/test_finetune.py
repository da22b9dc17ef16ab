"""finetune/: a tiny random Llama with SmolLM2's tokenizer, trained for real with torchrun (2 ranks, gloo)."""
import json
import os
import subprocess
import sys

import torch

from finetune.finetuning import forward_loss_sum
from finetune.raft_dataset import collate, encode, pack, unpacked
from tests.conftest import ROOT

FINETUNE = str(ROOT / "finetune" / "finetuning.py")


def write_records(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"seed_task_{i}", "question": f"What is fact {i}?",
                                "instruction": f"<DOCUMENT>Fact {i}: the value is {i * 7}.</DOCUMENT>\nWhat is fact {i}?",
                                "cot_answer": f"##begin_quote## Fact {i}: the value is {i * 7}. ##end_quote## "
                                              f"<ANSWER>: {i * 7}"}) + "\n")
    return str(path)


def torchrun(*args, nproc=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           FINETUNE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def failure(run) -> str:
    """What a failed torchrun printed: the last log lines, and the end of stderr, where a rank that died of a
    signal has its Python stack (the trainer enables faulthandler) before torchrun's own summary."""
    return f"stdout: ...{run.stdout[-1500:]}\nstderr: ...{run.stderr[-8000:]}"


def common(model, data, root, *extra):
    return ["--enable_fsdp", "--model_name", str(model), "--dataset", "raft", "--data_path", data,
            "--dist_checkpoint_root_folder", str(root), "--dist_checkpoint_folder", "fine-tuned",
            "--context_length", "256", "--lr", "3e-3", "--log_every", "1", "--val_split", "0.25", *extra]


def test_two_rank_fsdp_run_overfits_and_writes_metrics(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl")
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--num_epochs", "4", "--batching_strategy", "padding"))
    assert run.returncode == 0, failure(run)
    folder = tmp_path / "ckpt" / "fine-tuned"
    metrics = json.loads((folder / "metrics.json").read_text())
    losses = [m["train_loss"] for m in metrics["steps"]]
    assert len(losses) == 4 * 4                  # 9 train examples / 2 ranks = 4 steps an epoch, 4 epochs
    assert losses[-1] < 0.6 * losses[0]
    assert len(metrics["epochs"]) == 4 and all(m["val_perplexity"] > 1 for m in metrics["epochs"])
    assert metrics["epochs"][-1]["val_loss"] < metrics["epochs"][0]["val_loss"]
    assert (folder / "loss.png").stat().st_size > 1000
    assert (folder / "latest.json").exists() and "tokens/s" in run.stdout and "peak memory" in run.stdout


def test_resume_reproduces_the_uninterrupted_losses(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl", n=16)
    straight = torchrun(*common(tiny_model, data, tmp_path / "a", "--num_epochs", "2", "--max_steps", "8"))
    assert straight.returncode == 0, failure(straight)
    first = torchrun(*common(tiny_model, data, tmp_path / "b", "--num_epochs", "2", "--max_steps", "2"))   # mid-epoch
    assert first.returncode == 0, failure(first)
    resumed = torchrun(*common(tiny_model, data, tmp_path / "b", "--num_epochs", "2", "--max_steps", "8", "--resume"))
    assert resumed.returncode == 0, failure(resumed)
    assert "resumed from" in resumed.stdout
    metrics = lambda root: json.loads((root / "fine-tuned" / "metrics.json").read_text())
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a["steps"]) == 8 and len(a["epochs"]) == 1       # 12 train rows, 2 ranks: 6 steps an epoch
    assert b["steps"] == a["steps"] and b["epochs"] == a["epochs"]


def test_conversion_round_trip_loads_and_generates(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl")
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--max_steps", "2"))
    assert run.returncode == 0, failure(run)
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "finetune" / "checkpoint_converter.py"), "--fsdp_checkpoint_path",
                           str(tmp_path / "ckpt" / "fine-tuned"), "--consolidated_model_path", str(out),
                           "--gguf", str(tmp_path / "student.gguf"), "--gguf_outtype", "f32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert tokenizer.chat_template and (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is fact 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    # The GGUF that llama.cpp serves holds the same model: same logits when read back.
    from transformers import GgufConfig
    gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="student.gguf",
                                                quantization_config=GgufConfig(dequantize=True))
    with torch.no_grad():
        assert torch.allclose(gguf(**prompt).logits, model(**prompt).logits, atol=1e-4)


def test_packing_and_padding_give_the_same_loss(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from config import EVAL_SCHEMA, load_config
    from finetune.raft_dataset import load_records
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rag_prompt = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rag_prompt"]
    examples = encode(load_records([write_records(tmp_path / "r.jsonl", n=4)]), tokenizer, rag_prompt, 1024).examples
    tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels in examples)
    with torch.no_grad():
        packed = forward_loss_sum(model, collate(pack(examples, 1024), tokenizer.pad_token_id), "packing", "cpu")
        batch = collate(unpacked(examples), tokenizer.pad_token_id)
        padded = forward_loss_sum(model, batch, "padding", "cpu")
        # The reference: logits at every position, loss where labelled (what logits_to_keep avoids computing).
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                      ignore_index=-100, reduction="sum")
    assert torch.allclose(padded, reference, rtol=1e-5)
    assert len(pack(examples, 1024)) == 1
    assert torch.allclose(packed / tokens, padded / tokens, atol=1e-5), (packed / tokens, padded / tokens)


def test_bad_input_is_one_message_from_rank_zero(tiny_model, tmp_path):
    run = torchrun(*common(tiny_model, str(tmp_path / "missing.jsonl"), tmp_path / "ckpt"))
    assert run.returncode != 0
    # One line from rank 0; the only traceback is torchrun's own report that a child failed, none from the ranks.
    assert run.stderr.count("error: data file") == 1 and "finetuning.py\", line" not in run.stderr
    plain = subprocess.run([sys.executable, FINETUNE, "--model_name", str(tiny_model), "--data_path", str(tmp_path / "x"),
                            "--dist_checkpoint_root_folder", str(tmp_path / "c")], capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[-1].startswith("error: data file")


def test_lora_trains_only_the_adapter_and_converts_to_adapter_and_merged_model(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl")
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--num_epochs", "5", "--use_peft", "--peft_method",
                           "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0", "--lr", "3e-2",
                           "--lora_target_modules", "q_proj", "v_proj", "up_proj", "down_proj"))
    assert run.returncode == 0, failure(run)
    assert "parameters trained (LoRA)" in run.stdout
    losses = [m["train_loss"] for m in json.loads((tmp_path / "ckpt" / "fine-tuned" / "metrics.json").read_text())["steps"]]
    assert losses[-1] < losses[0] - 0.5          # a random tiny model learns slowly through rank-8 adapters

    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "finetune" / "checkpoint_converter.py"), "--fsdp_checkpoint_path",
                           str(tmp_path / "ckpt" / "fine-tuned"), "--consolidated_model_path", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    merged = AutoModelForCausalLM.from_pretrained(out)
    # Only the adapted layers changed; the rest is the original model, bit for bit.
    assert torch.equal(merged.model.layers[0].mlp.gate_proj.weight, original.model.layers[0].mlp.gate_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    # The adapter on the original model computes what the merged model computes.
    adapted = PeftModel.from_pretrained(original, out / "lora_adapter").eval()
    ids = torch.tensor([[1, 50, 300, 7, 42, 9]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
    assert (out / "lora_adapter" / "adapter_config.json").exists()


def test_validation_counts_every_row_even_fewer_than_ranks(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl", n=8)         # val_split 0.2: 1 validation row, 2 ranks
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--val_split", "0.2", "--max_steps", "3",
                           "--save_checkpoints", "False"))
    assert run.returncode == 0, failure(run)
    [epoch] = json.loads((tmp_path / "ckpt" / "fine-tuned" / "metrics.json").read_text())["epochs"]
    assert epoch["val_loss"] == epoch["val_loss"] and epoch["val_loss"] > 0      # not NaN
