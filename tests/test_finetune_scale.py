"""finetune/ on the paths that only real scale exercises, simulated on a CPU: train and eval modes on every rank,
packed rows under flash attention, checkpoint rotation, resuming on another number of ranks, two torchrun
"nodes" on 127.0.0.1, and a user error that must reach the terminal under torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from finetune import checkpoints
from finetune.finetuning import Shape, epoch_order, forward_loss_sum, step_micro_batches, steps_left, to_batch
from finetune.raft_dataset import collate, encode, join_rows, load_records, pack, split_by_question
from tests.conftest import GGUF, ROOT, free_port, save_random_llama
from tests.test_finetune import FINETUNE, common, failure, torchrun, write_records


def metrics_of(root, folder="fine-tuned"):
    return json.loads((root / folder / "metrics.json").read_text())


def losses(metrics):
    return [m["train_loss"] for m in metrics["steps"]]


# ---- train and eval modes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """8 layers of hidden 256: at 3,000 tokens a step its activations (~0.5 GB in float32) dwarf its weights."""
    return save_random_llama(tmp_path_factory.mktemp("deep-llama"), hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=8, max_position_embeddings=4096)


def write_long_records(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            docs = "".join(f"<DOCUMENT>{' '.join(f'fact {i}.{d}.{w} is {w * 7}' for w in range(25))}</DOCUMENT>\n"
                           for d in range(5))
            f.write(json.dumps({"question": f"What is fact {i}?", "instruction": docs + f"What is fact {i}?",
                                "cot_answer": f"##begin_quote## fact {i}.0.1 is 7 ##end_quote## <ANSWER>: 7"}) + "\n")
    return str(path)


def test_gradient_checkpointing_recomputes_on_every_rank(deep_model, tmp_path):
    """transformers checkpoints a layer only in train mode; rank 0 loads its model in eval mode, so without an
    explicit model.train() it kept every activation while the other ranks recomputed them."""
    data = write_long_records(tmp_path / "long.jsonl")
    peaks = {}
    for flag in ([], ["--gradient_checkpointing"]):
        root = tmp_path / ("gc" if flag else "plain")
        run = torchrun(*common(deep_model, data, root, "--context_length", "2048", "--batching_strategy", "padding",
                               "--run_validation", "False", "--max_steps", "1", "--mixed_precision", "False",
                               "--save_checkpoints", "False", *flag))
        assert run.returncode == 0, failure(run)
        peaks[bool(flag)] = metrics_of(root)["peak_memory_mb_per_rank"]
    assert len(peaks[True]) == 2
    for rank, (without, with_gc) in enumerate(zip(peaks[False], peaks[True])):
        assert without - with_gc > 150, f"rank {rank}: {without} MB without checkpointing, {with_gc} MB with it"


def test_validation_loss_is_the_eval_mode_loss_with_lora_dropout(tiny_model, tmp_path):
    """Validation runs without dropout on every rank: its loss equals the converted model's loss on the
    validation rows in eval mode. (Ranks built from the config used to validate with LoRA dropout on.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from config import EVAL_SCHEMA, load_config
    data = write_records(tmp_path / "raft.jsonl", n=12)
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--num_epochs", "1", "--use_peft", "--lora_dropout",
                           "0.5", "--lr", "3e-2", "--lora_target_modules", "q_proj", "v_proj", "up_proj",
                           "--batching_strategy", "padding", "--mixed_precision", "False"))
    assert run.returncode == 0, failure(run)
    [epoch] = metrics_of(tmp_path / "ckpt")["epochs"]
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "finetune" / "checkpoint_converter.py"), "--fsdp_checkpoint_path",
                           str(tmp_path / "ckpt" / "fine-tuned"), "--consolidated_model_path", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    _, held_out = split_by_question(load_records([data]), 0.25, seed=42)
    rag_prompt = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rag_prompt"]
    examples = encode(held_out, tokenizer, rag_prompt, 256).examples
    with torch.no_grad():
        batches = [collate([{"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids)))}],
                           tokenizer.pad_token_id) for ids, labels in examples]
        total = sum(forward_loss_sum(model, b, "padding", "cpu").item() for b in batches)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert epoch["val_loss"] == pytest.approx(total / tokens, rel=1e-4)


# ---- packed rows and flash attention -------------------------------------------------------------------------
def test_packed_rows_laid_end_to_end_give_the_same_loss(tiny_model, tmp_path):
    """Flash attention separates packed examples only in a one-row batch; the trainer joins a micro-batch's rows
    for it. Joined, the rows give exactly the loss they give as a batch (SDPA, which masks either way)."""
    from types import SimpleNamespace
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from config import EVAL_SCHEMA, load_config
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rag_prompt = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rag_prompt"]
    examples = encode(load_records([write_records(tmp_path / "r.jsonl", n=6)]), tokenizer, rag_prompt, 1024).examples
    rows = pack(examples, 400)
    assert len(rows) >= 2
    joined = to_batch(rows, SimpleNamespace(join_packed_rows=True), tokenizer.pad_token_id)
    separate = to_batch(rows, SimpleNamespace(join_packed_rows=False), tokenizer.pad_token_id)
    assert joined["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert separate["input_ids"].shape[0] == len(rows)
    assert joined["position_ids"][0].tolist() == join_rows(rows)["position_ids"]
    with torch.no_grad():
        assert torch.allclose(forward_loss_sum(model, joined, "packing", "cpu"),
                              forward_loss_sum(model, separate, "packing", "cpu"), rtol=1e-5)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_only_the_newest_checkpoints_are_kept_and_a_damaged_latest_is_one_line(tiny_model, tmp_path):
    data = write_records(tmp_path / "raft.jsonl", n=16)
    run = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--save_every", "1", "--max_steps", "4",
                           "--keep_checkpoints", "2"))
    assert run.returncode == 0, failure(run)
    assert "existing checkpoint" not in run.stderr          # the last step, saved by --save_every, is not saved again
    folder = tmp_path / "ckpt" / "fine-tuned"
    assert checkpoints.step_folders(folder) == ["step_3", "step_4"]
    assert json.loads((folder / "latest.json").read_text())["path"] == "step_4"
    assert not list(folder.glob(".*.tmp"))                    # written through a temporary file, then renamed
    (folder / "latest.json").write_text('{"path": "step_4", "st')       # torn
    again = torchrun(*common(tiny_model, data, tmp_path / "ckpt", "--max_steps", "6", "--resume"))
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "latest.json is damaged" in errors[0] and "step_3, step_4" in errors[0]
    assert "finetuning.py\", line" not in again.stderr


def test_pruning_keeps_what_latest_names(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / ".metadata").write_text("")
    checkpoints.write_json_atomically(tmp_path / "latest.json", {"path": "step_2"})
    assert checkpoints.prune(tmp_path, keep=1) == ["step_1", "step_3"]
    assert checkpoints.step_folders(tmp_path) == ["step_2", "step_4"]
    assert checkpoints.prune(tmp_path, keep=0) == []
    checkpoints.write_json_atomically(tmp_path / "latest.json", {"path": "step_9"})
    with pytest.raises(checkpoints.CheckpointError, match="not a complete checkpoint"):
        checkpoints.read_latest(tmp_path)


# ---- the data position and resuming on another shape -------------------------------------------------------
def test_the_epoch_order_is_dealt_the_same_whatever_the_shape():
    order = epoch_order(12, seed=3)
    assert sorted(order) == list(range(12)) and order == epoch_order(12, seed=3)

    def consumed(start, shape):
        step = [row for rank in range(shape.world) for micro in step_micro_batches(order, start, shape, rank)
                for row in micro]
        return sorted(step)
    eight, four = Shape(8, 1, 1), Shape(2, 1, 2)
    assert consumed(0, eight) == sorted(order[:8])
    assert consumed(8, four) == sorted(order[8:12])
    assert steps_left(12, 0, eight) == 1 and steps_left(12, 8, four) == 1 and steps_left(12, 10, four) == 0


@pytest.mark.parametrize("first, then", [(("2", "1"), ("1", "2")), (("1", "2"), ("2", "1"))],
                         ids=["2 ranks then 1", "1 rank then 2"])
def test_resuming_on_another_number_of_ranks_continues_the_same_data(tiny_model, tmp_path, first, then):
    """Two ranks x 1 row and one rank x 2 rows take the same rows in a step: a run stopped on one shape and resumed
    on the other must give the uninterrupted run's losses, step for step (the data order is the same)."""
    data = write_records(tmp_path / "raft.jsonl", n=16)         # 12 train rows: 6 steps of 2 rows an epoch
    shape = lambda nproc_batch: ("--batch_size_training", nproc_batch[1], "--batching_strategy", "padding",
                                 "--mixed_precision", "False", "--cpu_threads", "1")
    straight = torchrun(*common(tiny_model, data, tmp_path / "a", "--num_epochs", "2", "--max_steps", "9",
                                *shape(first)), nproc=int(first[0]))
    assert straight.returncode == 0, failure(straight)
    stopped = torchrun(*common(tiny_model, data, tmp_path / "b", "--num_epochs", "2", "--max_steps", "3",
                               *shape(first)), nproc=int(first[0]))
    assert stopped.returncode == 0, failure(stopped)
    resumed = torchrun(*common(tiny_model, data, tmp_path / "b", "--num_epochs", "2", "--max_steps", "9", "--resume",
                               *shape(then)), nproc=int(then[0]))
    assert resumed.returncode == 0, failure(resumed)
    assert f"written by {first[0]} rank(s) x batch {first[1]} x 1 accumulation, now {then[0]} x {then[1]} x 1" \
        in resumed.stdout
    a, b = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert [m["step"] for m in b["steps"]] == list(range(1, 10))
    assert [m["step"] for m in b["epochs"]] == [m["step"] for m in a["epochs"]] == [6]
    assert losses(b) == pytest.approx(losses(a), abs=1e-4)
    assert b["epochs"][0]["train_loss"] == pytest.approx(a["epochs"][0]["train_loss"], abs=1e-4)


# ---- several nodes -----------------------------------------------------------------------------------------------
def test_two_nodes_on_one_machine_train_like_one_node_with_two_processes(tiny_model, tmp_path):
    """The README's multi-node command: one torchrun per node, c10d rendezvous at node 0 (here 127.0.0.1)."""
    data = write_records(tmp_path / "raft.jsonl", n=12)
    args = lambda root: [FINETUNE, *common(tiny_model, data, root, "--max_steps", "4", "--cpu_threads", "1",
                                           "--mixed_precision", "False")]
    single = torchrun(*args(tmp_path / "one")[1:])
    assert single.returncode == 0, failure(single)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "raft-test", *args(tmp_path / "two")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-2000:] for _, err in outputs)
    assert losses(metrics_of(tmp_path / "two")) == pytest.approx(losses(metrics_of(tmp_path / "one")), abs=1e-6)
    assert len(losses(metrics_of(tmp_path / "one"))) == 4


# ---- user errors under torchrun -----------------------------------------------------------------------------------
def test_a_user_error_reaches_the_terminal_under_torchrun(tmp_path):
    """Every rank finds that no example fits; rank 1, which builds its model on the meta device while rank 0 reads
    and dequantizes the real GGUF weights, finds it first and exits, and torchrun then stops rank 0. The message
    must still be printed, once. (Before the fix the terminal showed only torchrun's ChildFailedError.)"""
    data = write_records(tmp_path / "raft.jsonl")
    run = torchrun(*common(GGUF, data, tmp_path / "ckpt", "--context_length", "48"))
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no training example fits --context_length 48"), \
        failure(run)
