"""What a fine-tuning run at the recipe's scale needs: memory per GPU and hours, computed (not measured) from the
parameter counts and the throughput measured by bench/finetune_gpu.py. Prints a table; asserts nothing.

  python bench/finetune_plan.py                                  # Llama 3 8B, context 8192, 10K RAFT examples
  python bench/finetune_plan.py --examples 30000 --mfu 0.35      # your data set, a better measured MFU

The model of memory, per GPU, with FSDP over N GPUs (fully_shard per decoder layer, bf16 compute):
  full fine-tune   16 bytes per parameter / N (fp32 weights, fp32 gradients, AdamW's two fp32 moments)
  LoRA             4 bytes per frozen parameter / N (fp32 weights) + 16 bytes per adapter parameter / N
  + two decoder layers gathered in bf16 (the one computing and the one prefetched), for the weights and again
    for their gradients
  + activations of one row of --context_length tokens: with --gradient_checkpointing the input of every layer
    (context x hidden x 2 bytes) plus one layer's full set; without it, every layer's full set. A layer's full
    set is ACTIVATION_BYTES_PER_TOKEN_HIDDEN x hidden bytes a token (bf16, flash attention or memory-efficient
    SDPA, so no context^2 term)
  + logits at answer positions only (ANSWER_SHARE of the tokens x vocabulary x 4 bytes x 3: logits, softmax,
    gradient)
The constant is checked against the measurement it came from: the 1.07B model at 4 x 4096 tokens a step
without checkpointing (46.1 GiB measured on an H100); the script prints its own figure for that case first.

Time: tokens/s per GPU = MFU x peak / training FLOPs per token; FLOPs per token = 6 x (matmul parameters, the
lm_head's only at answer positions) + 6 x layers x hidden x mean example length (causal attention within an
example); LoRA skips the weight gradients of the frozen layers: 4 instead of 6. MFU defaults to the 20.5%
measured on an H100 with the 1.07B model (bench/finetune_gpu.py); larger matrices usually do better, so the hours
are an upper estimate for compute, and communication between nodes is not modelled.
"""
import argparse
from dataclasses import dataclass

ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 54     # bf16 bytes per token per hidden unit, one layer; fitted to the 46.1 GiB
ANSWER_SHARE = 0.2                         # RAFT: the chain-of-thought answer is about a fifth of an example
PEAK_FLOPS = {"H100": 989e12, "A100": 312e12, "H200": 989e12}


@dataclass(frozen=True)
class Llama:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    def layer_parameters(self) -> int:
        kv = self.kv_heads * self.hidden // self.heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_parameters() + embeddings

    def lora_parameters(self, rank: int) -> int:
        """Adapters on q_proj and v_proj (the trainer's default): r x (in + out) each."""
        kv = self.kv_heads * self.hidden // self.heads
        return self.layers * rank * ((self.hidden + self.hidden) + (self.hidden + kv))


LLAMA3_8B = Llama("Llama 3 8B", 4096, 32, 32, 8, 14336, 128256, tied=False)
BENCH_1B = Llama("1.07B (bench)", 2048, 16, 32, 8, 8192, 49152, tied=True)
GIB = 2 ** 30


def memory_gib(model: Llama, gpus: int, tokens_per_step: int, lora: bool, checkpointing: bool,
               lora_rank: int = 16) -> float:
    if lora:
        states = 4 * model.parameters() + 16 * model.lora_parameters(lora_rank)
    else:
        states = 16 * model.parameters()
    gathered = 2 * 2 * 2 * model.layer_parameters()           # two layers, bf16, weights and gradients
    layer_set = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * model.hidden * tokens_per_step
    if checkpointing:
        activations = model.layers * tokens_per_step * model.hidden * 2 + layer_set
    else:
        activations = model.layers * layer_set
    logits = ANSWER_SHARE * tokens_per_step * model.vocab * 4 * 3
    return (states / gpus + gathered + activations + logits) / GIB


def flops_per_token(model: Llama, mean_example: float, lora: bool) -> float:
    lm_head = model.vocab * model.hidden * ANSWER_SHARE
    per_matmul_parameter = 4 if lora else 6
    return per_matmul_parameter * (model.layers * model.layer_parameters() + lm_head) \
        + 6 * model.layers * model.hidden * mean_example


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=10_000, help="RAFT examples (the tutorial's finding: about 10K)")
    p.add_argument("--mean_tokens", type=float, default=1500, help="tokens of a RAFT example (chunk 1000, 5 documents)")
    p.add_argument("--context", type=int, default=8192, help="--context_length: tokens of one packed row")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.205, help="model FLOPs utilisation (measured: 0.205 on an H100)")
    p.add_argument("--gpu", choices=list(PEAK_FLOPS), default="H100")
    args = p.parse_args()

    check = memory_gib(BENCH_1B, 1, 4 * 4096, lora=False, checkpointing=False)
    print(f"check: {BENCH_1B.name}, 1 GPU, 4 x 4096 tokens a step, no checkpointing: {check:.1f} GiB computed, "
          "46.1 GiB measured (bench/finetune_gpu.py, H100)")
    print(f"{LLAMA3_8B.name}: {LLAMA3_8B.parameters() / 1e9:.2f}B parameters; {args.examples:,} examples of "
          f"{args.mean_tokens:.0f} tokens packed into rows of {args.context}, {args.epochs} epoch(s); one row per "
          f"GPU a step; {args.gpu} at {args.mfu:.1%} MFU")
    print(f"{'GPUs':>4}  {'method':5}  {'GiB per GPU, checkpointing':>27}  {'GiB without':>11}  "
          f"{'tokens/s (all GPUs)':>19}  {'hours':>6}")
    total_tokens = args.examples * args.mean_tokens * args.epochs
    for gpus in (4, 8):
        for lora in (False, True):
            with_gc = memory_gib(LLAMA3_8B, gpus, args.context, lora, checkpointing=True)
            without = memory_gib(LLAMA3_8B, gpus, args.context, lora, checkpointing=False)
            rate = gpus * args.mfu * PEAK_FLOPS[args.gpu] / flops_per_token(LLAMA3_8B, args.mean_tokens, lora)
            print(f"{gpus:>4}  {'LoRA' if lora else 'full':5}  {with_gc:>27.1f}  {without:>11.1f}  {rate:>19,.0f}  "
                  f"{total_tokens / rate / 3600:>6.2f}")


if __name__ == "__main__":
    main()
