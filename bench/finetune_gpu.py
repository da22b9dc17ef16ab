"""Throughput and MFU of finetune/finetuning.py on one GPU: a randomly initialised 1B-class Llama (hidden 2048,
16 layers) in bf16 compute at sequence 4096 with packing, for 50 optimizer steps. Prints numbers.

  python3 bench/finetune_gpu.py --tokenizer DIR --work /tmp/ftbench       # on the GPU machine
  python3 bench/finetune_gpu.py --tokenizer DIR --work /tmp/ftbench --tiny  # a CPU smoke run of this script

Two data shapes, both packed to 4096-token rows: RAFT-sized examples (~1000 tokens, five documents and an
answer, several per row: attention is block-diagonal) and single 4000-token examples (one per row: plain
causal attention). Throughput counts non-padding tokens; it is the mean of the logged intervals after the
first 10 steps (the first steps include CUDA warm-up). MFU = tokens/s x model FLOPs per token / peak, with
model FLOPs per token = 6 x (matmul parameters; the lm_head's times the share of answer tokens, the only positions
where the trainer computes logits) + 6 x layers x hidden x mean example length (attention, causal, within each
example); peak: H100/H200 SXM dense bf16, 989 TFLOP/s.
"""
import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hardware import compute_dtype  # noqa: E402
WORDS = ("llama model token context window layer attention tensor shard gradient batch learning rate "
         "license guard prompt answer document question memory GPU node cluster quantize adapter").split()


def write_records(path: Path, n: int, doc_words: int, answer_words: int, seed: int = 0):
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    with open(path, "w") as f:
        for i in range(n):
            docs = "".join(f"<DOCUMENT>{text(doc_words)}</DOCUMENT>\n" for _ in range(5))
            f.write(json.dumps({"instruction": docs + f"What is item {i}?",
                                "cot_answer": f"{text(answer_words)}\n<ANSWER>: item {i}"}) + "\n")


def model_flops_per_token(config, mean_length: float, answer_share: float) -> float:
    """FLOPs the trainer executes per token: the lm_head runs only at answer positions (logits_to_keep)."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter          # q, o, k, v projections and the gated MLP
    matmul = layers * per_layer + d * config.vocab_size * answer_share          # plus the lm_head
    return 6 * matmul + 6 * layers * d * mean_length


def run(args, name, data, model_dir, work) -> dict:
    cmd = [sys.executable, str(ROOT / "finetune" / "finetuning.py"), "--enable_fsdp", "--model_name", str(model_dir),
           "--data_path", str(data), "--context_length", str(args.seq), "--batching_strategy", "packing",
           "--max_steps", str(args.steps), "--num_epochs", "10", "--batch_size_training", str(args.batch), "--log_every", "10", "--run_validation", "False", "--lr", "1e-5",
           "--save_checkpoints", "False", "--dist_checkpoint_root_folder", str(work / "ckpt"),
           "--dist_checkpoint_folder", name]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    logged = [(int(m[1]), float(m[2]), float(m[3])) for m in
              re.finditer(r"step (\d+) .*?\| (\d+) tokens/s since the last log \| peak memory (\d+) MB", done.stdout)]
    steady = [rate for step, rate, _ in logged if step > 10]
    return {"tokens_per_s": sum(steady) / len(steady), "peak_memory_mb": logged[-1][2], "log": done.stdout}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder (chat template needed)")
    p.add_argument("--work", required=True, help="scratch folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="4096-token rows per step: one row leaves the GPU idle "
                   "half the time (measured: 112 ms of GPU work in a 263 ms step, the rest Python and launches)")
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, to check this script")
    args = p.parse_args()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if args.tiny else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    if args.tiny:
        args.seq, args.steps = 1024, 30
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    model_dir = work / "model"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parameters = sum(t.numel() for t in model.parameters())
    del model
    scale = 8 if args.tiny else 1
    shapes = {"RAFT-sized examples, packed": (work / "raft.jsonl", 120, 140 // scale, 150 // scale),
              "4000-token examples, one per row": (work / "long.jsonl", 60, 520 // scale, 300 // scale)}
    peak = 989.4e12
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    precision, why = compute_dtype("auto")         # what the trainer's --mixed_precision auto picks here
    print(f"device {name}; model: {parameters / 1e9:.2f} B parameters, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, vocab {config.vocab_size}; sequence {args.seq}, {args.batch} rows a step, "
          f"{args.steps} steps, "
          f"{precision} compute with fp32 master weights ({why}; FSDP2 MixedPrecisionPolicy), SDPA")
    for label, (path, n, doc_words, answer_words) in shapes.items():
        write_records(path, n * (4 if not args.tiny else 1), doc_words, answer_words)
        records = [json.loads(line) for line in open(path)]
        lengths = [len(tokenizer(r["instruction"] + r["cot_answer"])["input_ids"]) for r in records]
        answers = [len(tokenizer(r["cot_answer"])["input_ids"]) for r in records]
        mean_length = sum(lengths) / len(lengths)
        result = run(args, path.stem, path, model_dir, work)
        flops = model_flops_per_token(config, mean_length, sum(answers) / sum(lengths))
        print(f"{label}: mean example {mean_length:.0f} tokens | {result['tokens_per_s']:.0f} tokens/s | "
              f"{result['tokens_per_s'] * flops / 1e12:.1f} TFLOP/s | MFU {result['tokens_per_s'] * flops / peak:.1%} "
              f"(of {peak / 1e12:.0f} TFLOP/s) | peak memory {result['peak_memory_mb'] / 1024:.1f} GiB")
        (work / f"{path.stem}.log").write_text(result["log"])


if __name__ == "__main__":
    main()
