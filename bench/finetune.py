"""Fine-tuning throughput on CPU: finetune/finetuning.py against the Hugging Face Trainer, in the same run.

  HF_HUB_OFFLINE=1 .venv/bin/python bench/finetune.py [--steps 8] [--model tiny|smollm2] [--data_path raft.jsonl]

Both sides train the same model (a small randomly initialised Llama with SmolLM2's tokenizer, or SmolLM2-135M
itself) on the same RAFT examples with the same labels (finetune/raft_dataset.py masks the prompt), with 2
torchrun processes on gloo (OMP_NUM_THREADS=1 each), the precision hardware.py picks for this machine (bf16 compute
where the CPU has bf16 units, float32 elsewhere; printed first) and about 8 examples per optimizer step:
  this trainer   FSDP2, examples packed into rows of --context_length tokens (~4 examples a row, 1 row per rank),
                 and again with its padding strategy (4 examples per process, padded to the longest), both with
                 logits only at answer positions
  HF Trainer     DDP, 4 examples per process, padded to the longest in the batch (its standard collator),
                 SDPA attention, bf16 autocast where the trainer computes in bf16, length-grouped batches (train_sampling_strategy="group_by_length":
                 its own cure for padding)
Throughput counts useful (non-padding) tokens per second over the steps after the first (warm-up); peak memory
is rank 0's peak resident set size. Without --data_path, RAFT examples are assembled from data/'s real chunks
(oracle + 4 distractors, a quoted chain-of-thought answer), as raft.py would.
"""
import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hardware import CHOICES, compute_dtype  # noqa: E402
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"      # fetched by scripts/teacher.sh setup


# ---- shared set-up ------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    if not GGUF.exists():
        raise SystemExit(f"{GGUF} not found: run scripts/teacher.sh setup (make setup) first")
    return GGUF


def build_model(kind: str, folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    if kind == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     quantization_config=GgufConfig(dequantize=True))
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def raft_records_from_data(n: int, seed: int = 0) -> list[dict]:
    """RAFT records over data/'s chunks, shaped as raft.py writes them (the teacher's part is synthetic)."""
    from documents import load_documents, split_documents
    from raft_utils import QA, AssemblySettings, assemble
    chunks, _ = split_documents(load_documents(str(ROOT / "data"), "").documents, 1000)
    rng = random.Random(seed)
    qas = []
    for i in range(n):
        index = i % len(chunks)
        sentences = re.split(r"(?<=[.!?])\s+", chunks[index].text)
        quote = max(sentences, key=len)
        qas.append(QA(index, f"Question {i}: what does the text say about {quote.split()[0]}?",
                      f"The question asks about a detail of the guide. ##begin_quote## {quote} ##end_quote## "
                      f"This sentence answers it, so the answer follows from it.\n<ANSWER>: "
                      f"{' '.join(quote.split()[:rng.randint(4, 12)])}", True))
    return assemble(qas, chunks, AssemblySettings(4, 0.8, 0.0, ""), seed)


def encoded_examples(records, folder: Path):
    from transformers import AutoTokenizer
    from config import EVAL_SCHEMA, load_config
    from finetune.raft_dataset import encode
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rag_prompt = load_config(str(ROOT / "raft_eval_config.yaml"), EVAL_SCHEMA)["rag_prompt"]
    return encode(records, tokenizer, rag_prompt, 8192).examples, tokenizer


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the Hugging Face Trainer side (runs inside torchrun) ---------------------------------------------------
def hf_worker(args):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    records = [json.loads(line) for line in open(args.data)]
    examples, tokenizer = encoded_examples(records, Path(args.model_dir))
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    useful = {"tokens": 0}

    def collate(batch):
        """Dynamic padding to the longest in the batch, labels padded with -100 (DataCollatorForSeq2Seq's job)."""
        longest = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([r["input_ids"] + [pad] * (longest - len(r["input_ids"])) for r in batch]),
                "labels": torch.tensor([r["labels"] + [-100] * (longest - len(r["labels"])) for r in batch]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"]))
                                                for r in batch])}

    class Clock(TrainerCallback):
        def on_step_end(self, state_args, state, control, **kwargs):
            if state.global_step == 1:      # the first step is warm-up
                self.tokens, self.started = useful["tokens"], time.perf_counter()

        def on_train_end(self, *a, **kwargs):
            self.seconds, self.tokens = time.perf_counter() - self.started, useful["tokens"] - self.tokens

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=torch.float32)

    def count(module, positional, kwargs):
        """Useful tokens of each forward pass (counted here, not in the collator: the data loader reads ahead)."""
        useful["tokens"] += int(kwargs["attention_mask"].sum())
    model.register_forward_pre_hook(count, with_kwargs=True)
    clock = Clock()
    training = TrainingArguments(output_dir=args.out, per_device_train_batch_size=args.per_device, max_steps=args.steps,
                                 learning_rate=1e-4, bf16=args.precision == "bfloat16", use_cpu=True, save_strategy="no", report_to=[],
                                 logging_steps=args.steps, dataloader_num_workers=0, ddp_backend="gloo",
                                 train_sampling_strategy="group_by_length", remove_unused_columns=False, seed=42,
                                 disable_tqdm=True)
    Trainer(model=model, args=training, train_dataset=rows, data_collator=collate, callbacks=[clock]).train()
    totals = torch.tensor([clock.tokens, clock.seconds], dtype=torch.float64)
    dist.all_reduce(totals)
    if dist.get_rank() == 0:
        print("HF_RESULT " + json.dumps({"tokens_per_s": totals[0].item() / (totals[1].item() / dist.get_world_size()),
                                         "peak_mb_rank0": peak_rss_mb()}), flush=True)


# ---- the driver -------------------------------------------------------------------------------------------
def torchrun(*command, timeout=3600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def ours(model_dir: Path, data: Path, work: Path, strategy: str, context_length: int, batch: int, steps: int,
         precision: str) -> dict:
    out = torchrun(str(ROOT / "finetune" / "finetuning.py"), "--enable_fsdp", "--model_name", str(model_dir),
                   "--mixed_precision", str(precision == "bfloat16"),
                   "--data_path", str(data), "--context_length", str(context_length), "--batching_strategy", strategy,
                   "--batch_size_training", str(batch), "--max_steps", str(steps), "--log_every", str(steps),
                   "--run_validation", "False", "--save_checkpoints", "False", "--lr", "1e-4",
                   "--dist_checkpoint_root_folder", str(work / "ours"))
    # The log line at the last step covers steps 2..last: the first step is warm-up.
    last = [line for line in out.splitlines() if line.startswith(f"step {steps} ")][-1]
    return {"tokens_per_s": float(re.search(r"([\d.]+) tokens/s", last).group(1)),
            "peak_mb_rank0": float(re.search(r"peak memory (\d+) MB", last).group(1))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--data_path", help="a raft.jsonl to train on (default: assembled from data/)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--hf_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--per_device", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=CHOICES, default="auto",
                        help="compute dtype of both sides (default auto: bf16 where the CPU has bf16 units)")
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    args.precision, why = compute_dtype(args.precision, "cpu")
    print(f"precision: {args.precision} ({why})", flush=True)

    examples_per_step = 8
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parameters = build_model(args.model, work / "model")
        needed = examples_per_step * (args.steps + 2)
        if args.data_path:
            records = [json.loads(line) for line in open(args.data_path)][:needed]
        else:
            records = raft_records_from_data(needed)
        data = work / "raft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        examples, _ = encoded_examples(records, work / "model")
        lengths = [len(ids) for ids, _ in examples]
        mean = sum(lengths) / len(lengths)
        # Rows of ~4 examples: with 2 ranks and 1 row each, a step sees ~8 examples, as the Trainer's 2 x 4.
        context_length = max(max(lengths), int(4 * mean) // 64 * 64 + 64)
        print(f"model: {args.model} ({parameters / 1e6:.1f}M parameters); {len(records)} RAFT examples, "
              f"{mean:.0f} tokens on average ({min(lengths)}-{max(lengths)}); {args.steps} steps of ~{examples_per_step} "
              f"examples per side; packing rows of {context_length} tokens", flush=True)

        packed = ours(work / "model", data, work, "packing", context_length, 1, args.steps, args.precision)
        padded = ours(work / "model", data, work, "padding", max(lengths), examples_per_step // 2, args.steps,
                      args.precision)
        out = torchrun(str(Path(__file__).resolve()), "--hf_worker", "--model_dir", str(work / "model"),
                       "--precision", args.precision,
                       "--data", str(data), "--out", str(work / "hf"), "--steps", str(args.steps),
                       "--per_device", str(examples_per_step // 2))
        theirs = json.loads(out.split("HF_RESULT ", 1)[1].splitlines()[0])

    print(f"{'':28}{'useful tokens/s':>16}{'peak memory rank 0':>20}   vs Trainer")
    for name, result in (("finetuning.py, packing", packed), ("finetuning.py, padding", padded),
                         ("HF Trainer, padding", theirs)):
        print(f"{name:28}{result['tokens_per_s']:16.0f}{result['peak_mb_rank0']:17.0f} MB   "
              f"{result['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
