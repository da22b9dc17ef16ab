"""Fine-tune a chat model on RAFT data with FSDP2: one GPU, many GPUs, or CPU processes.

  # the recipe: Llama 3 8B Instruct, full fine-tune on 8 GPUs
  torchrun --nnodes 1 --nproc_per_node 8 finetune/finetuning.py --enable_fsdp --lr 1e-5 --context_length 8192 \
      --num_epochs 1 --batch_size_training 1 --model_name meta-llama/Meta-Llama-3-8B-Instruct \
      --dist_checkpoint_root_folder ./raft-8b --dist_checkpoint_folder fine-tuned \
      --dataset raft --data_path output/raft.jsonl --run_validation True
  # two nodes of 8 GPUs: the same command on each node, with torchrun's rendezvous flags
  torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint NODE0:29500 ...
  # on a CPU, two processes over gloo
  torchrun --standalone --nproc_per_node 2 finetune/finetuning.py --enable_fsdp ...
  # or one plain process
  python finetune/finetuning.py ...

Each decoder layer, then the root, is sharded with fully_shard (FSDP2); NCCL on CUDA, gloo on CPU. Weights and
optimizer state stay fp32 ("master weights"); --mixed_precision auto (default) computes in bf16 where the hardware
multiplies it natively (a GPU with bf16, a CPU with AMX or AVX512-BF16) and in float32 elsewhere, where bf16 is
emulated and 40x slower (hardware.py decides; the log says what it chose and why). --pure_bf16 keeps the weights
themselves in bf16: with AdamW at lr 1e-5 the updates then vanish below bf16's resolution and the model does not
learn, so it is off by default. On a CPU each process uses its share of the node's cores (hardware.py).

Each epoch shuffles the rows once; an optimizer step takes the next world x batch x accumulation rows of that
order, dealt to the ranks. The loss is the mean over every answer token of an optimizer step, across
micro-batches and ranks, so that it does not depend on how the tokens are batched. Training steps run in train
mode (dropout, gradient checkpointing), validation in eval mode without gradients, on every rank.

Checkpoints (finetune/checkpoints.py: torch.distributed.checkpoint, one shard per rank) go to <root>/<folder>/step_N
with the step, the data position in global terms and the RNG state; the newest --keep_checkpoints are kept.
--resume continues from the newest one with the same losses as an uninterrupted run, on the same number of ranks
or another one. finetune/checkpoint_converter.py turns one into a Hugging Face folder.

A user error (bad data, a context too short) is printed once, by the first rank that finds it, before any rank
exits: torchrun stops the other processes as soon as one exits.
"""
import argparse
import faulthandler
import json
import math
import os
import random
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules

from config import EVAL_SCHEMA, ConfigError, load_config  # noqa: E402
from hardware import compute_dtype, threads_per_process  # noqa: E402
from finetune import checkpoints  # noqa: E402
from finetune.raft_dataset import (IGNORE_INDEX, DataError, collate, encode, join_rows, load_records, pack,  # noqa: E402
                                   split_by_question, unpacked)


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value}")


def mixed_precision_setting(value: str) -> str:
    """auto, or a boolean spelled as str2bool accepts it; returned as the hardware.compute_dtype choice."""
    if value.lower() == "auto":
        return "auto"
    return "bfloat16" if str2bool(value) else "float32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="Hugging Face model folder or name, or a .gguf file")
    p.add_argument("--dataset", default="raft", choices=["raft"])
    p.add_argument("--data_path", nargs="+", required=True, help="one or more raft.jsonl files, used together")
    p.add_argument("--prompt_config", default="raft_eval_config.yaml", help="YAML holding rag_prompt")
    p.add_argument("--enable_fsdp", action="store_true", help="shard with FSDP2 (needed for more than one process)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--context_length", type=int, default=8192, help="tokens per row; longer examples are cut")
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--batch_size_training", type=int, default=1, help="rows per micro-batch and process")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--batching_strategy", choices=["packing", "padding"], default="packing")
    p.add_argument("--run_validation", type=str2bool, default=True)
    p.add_argument("--val_split", type=float, default=0.1,
                   help="share of records held out, whole questions at a time (seed 42 split)")
    p.add_argument("--mixed_precision", type=mixed_precision_setting, default="auto",
                   help="bf16 compute with fp32 master weights: auto (default: where bf16 is native), true or false")
    p.add_argument("--pure_bf16", action="store_true", help="bf16 weights too (does not learn at lr 1e-5)")
    p.add_argument("--cpu_threads", type=int, default=0,
                   help="threads per process on a CPU (default 0: the usable cores / processes on the node)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--use_fast_kernels", action="store_true", help="flash attention 2 where installed, else SDPA")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps in all (0: no limit)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dist_checkpoint_root_folder", default="checkpoints")
    p.add_argument("--dist_checkpoint_folder", default="fine-tuned")
    p.add_argument("--save_every", type=int, default=0, help="also checkpoint every N steps (0: at epoch ends)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the folder (on any number of ranks)")
    p.add_argument("--keep_checkpoints", type=int, default=2,
                   help="keep the newest N step_* checkpoints and delete older ones (0: keep all)")
    p.add_argument("--save_checkpoints", type=str2bool, default=True, help="False for a throughput measurement")
    p.add_argument("--log_every", type=int, default=10, help="record the training loss every N steps")
    p.add_argument("--use_peft", action="store_true", help="train a LoRA adapter instead of every weight")
    p.add_argument("--peft_method", choices=["lora"], default="lora")
    p.add_argument("--lora_r", type=int, default=8, help="rank of the LoRA update matrices")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling: the update is multiplied by alpha / r")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--lora_target_modules", nargs="+", default=["q_proj", "v_proj"],
                   help="linear layers that get an adapter (add k_proj o_proj gate_proj up_proj down_proj for more)")
    p.add_argument("--use_wandb", action="store_true", help="also log to Weights & Biases (rank 0)")
    p.add_argument("--wandb_project", default="raft-finetune")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ set-up

def init_distributed(cpu_threads: int = 0) -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; a plain process becomes a group of one, so the code path is the same."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        # torchrun gives each process one thread by default; the processes of a node share its cores instead.
        torch.set_num_threads(cpu_threads or threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def choose_precision(args, device) -> tuple[str, str]:
    """(compute dtype, the line that says why): bf16 only where asked for or native (hardware.compute_dtype)."""
    if args.pure_bf16:
        _, why = compute_dtype("bfloat16", device.type)
        return "bfloat16", f"bf16 weights and compute (--pure_bf16; {why})"
    dtype, why = compute_dtype(args.mixed_precision, device.type)
    what = "bf16 compute, fp32 master weights" if dtype == "bfloat16" else "float32 compute and weights"
    return dtype, f"{what} (--mixed_precision {why})"


def load_tokenizer_and_model(args, device, rank: int, world: int):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    source, gguf, weights = args.model_name, {}, {}
    if source.endswith(".gguf"):
        source, gguf = str(Path(source).parent), {"gguf_file": Path(source).name}
        # dequantize=True: a GGUF model otherwise stays marked quantized, untrainable and unsaveable.
        weights = {"quantization_config": GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
    attention = "sdpa"
    if args.use_fast_kernels:
        try:
            import flash_attn  # noqa: F401
            attention = "flash_attention_2"
        except ImportError:
            pass
    # transformers hands flash attention the example boundaries of packed rows only when a batch has one row.
    args.join_packed_rows = attention == "flash_attention_2" and args.batching_strategy == "packing"
    dtype = torch.bfloat16 if args.pure_bf16 else torch.float32
    if args.enable_fsdp and world > 1 and rank > 0:
        # Only rank 0 reads the weights; the others build the same model on the meta device (no memory) and receive
        # their shards from rank 0 in shard(): a node holds one copy of the model in RAM, not one per process.
        config = AutoConfig.from_pretrained(source, **gguf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention, **gguf, **weights)
    model.config.use_cache = False     # a cache in training also hides packed rows from the attention mask
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.use_peft:
        model = add_lora(model, args)
    # With FSDP, fully_shard moves each shard to the device; without it, the whole model goes there now.
    return tokenizer, model if args.enable_fsdp else model.to(device)


def add_lora(model, args):
    """Freeze the model and add LoRA adapters; the optimizer then holds only the adapters' weights."""
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=args.lora_target_modules)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:      # e.g. a target module the model does not have
        raise DataError(f"LoRA cannot be added to {args.model_name}: {e}") from None


def decoder_layers(model):
    """The decoder layers that FSDP shards one by one, under a LoRA wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def shard(model, args, rank: int, world: int, device):
    if world > 1 and not args.enable_fsdp:
        raise DataError(f"{world} processes need --enable_fsdp")
    if not args.enable_fsdp:
        return model
    full_state = model.state_dict() if rank == 0 and world > 1 else {}     # rank 0 keeps them until sent
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if args.compute_dtype == "bfloat16" and not args.pure_bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if world > 1:
        if rank > 0:
            model.to_empty(device=device)       # memory for this rank's shards, filled from rank 0 below
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():          # e.g. rotary frequencies: buffers no state dict carries
            dist.broadcast(buffer, src=0)
    return model


def build_rows(records, args, tokenizer, rank):
    """Train and validation rows; the split and the encoding are the same on every rank. The split keeps every
    copy of a question (with the oracle, without it, the refusal) on one side, so validation never sees a question
    that was trained on."""
    train_records, val_records = split_by_question(records, args.val_split if args.run_validation else 0.0, seed=42)
    rag_prompt = load_config(args.prompt_config, EVAL_SCHEMA)["rag_prompt"]
    train = encode(train_records, tokenizer, rag_prompt, args.context_length)
    val = encode(val_records, tokenizer, rag_prompt, args.context_length)
    if not train.examples:
        raise DataError(f"no training example fits --context_length {args.context_length} "
                        f"({train.dropped} dropped whole): raise --context_length")
    to_rows = pack if args.batching_strategy == "packing" else (lambda ex, _: unpacked(ex))
    if rank == 0:
        print(f"data: {len(records)} records, {len(train.examples)} train / {len(val.examples)} validation examples; "
              f"{train.truncated + val.truncated} cut to {args.context_length} tokens, "
              f"{train.dropped + val.dropped} dropped (answer beyond the context length)", flush=True)
    return to_rows(train.examples, args.context_length), to_rows(val.examples, args.context_length), train, val


@dataclass(frozen=True)
class Shape:
    """How many rows one optimizer step takes: ranks x rows per micro-batch x micro-batches."""
    world: int
    batch: int
    accumulate: int

    @property
    def rows_per_step(self) -> int:
        return self.world * self.batch * self.accumulate


def epoch_order(rows: int, seed: int) -> list[int]:
    """The epoch's order of the rows: the same on every rank and for every number of ranks."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return order


def step_micro_batches(order: list[int], start: int, shape: Shape, rank: int) -> list[list[int]]:
    """This rank's micro-batches (row indices) of the optimizer step that begins at row `start` of the order: the
    step takes the next rows_per_step rows, and micro-batch m of rank r is the (m x world + r)-th slice of them."""
    def piece(m: int) -> list[int]:
        first = start + (m * shape.world + rank) * shape.batch
        return order[first:first + shape.batch]
    return [piece(m) for m in range(shape.accumulate)]


def steps_left(rows: int, position_rows: int, shape: Shape) -> int:
    """Whole optimizer steps left in an epoch of `rows` rows after `position_rows` of them (the rest is dropped:
    every rank must take the same number of steps)."""
    return (rows - position_rows) // shape.rows_per_step


# ------------------------------------------------------------------------------------------------ steps

def forward_loss_sum(model, batch, strategy, device) -> torch.Tensor:
    """Sum of the token losses of a micro-batch (divided later by the step's token count).

    Logits are computed only where the next token is learnt (the answers): the prompt, mostly retrieved documents,
    never meets the vocabulary projection, and no [tokens x vocabulary] fp32 tensor is built for it (at 8192 tokens
    and Llama 3's 128K vocabulary that tensor alone is 4 GB)."""
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}
    if strategy == "padding":
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    # Packed rows get no attention mask: transformers then builds a block-diagonal one from position_ids.
    targets = batch["labels"][:, 1:].to(device)
    learnt = torch.zeros_like(batch["labels"], dtype=torch.bool, device=device)
    learnt[:, :-1] = targets != IGNORE_INDEX
    logits = model(**inputs, use_cache=False, logits_to_keep=learnt).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[learnt[:, :-1]], reduction="sum")


def answer_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def all_sum(value: float, device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def autocast(args, device):
    """bf16 compute for a model without FSDP; under FSDP its MixedPrecisionPolicy casts the weights instead."""
    enabled = args.compute_dtype == "bfloat16" and not args.enable_fsdp and not args.pure_bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_batch(rows: list[dict], args, pad_id: int) -> dict:
    """A micro-batch as tensors. For flash attention, packed rows go end to end in one row: it finds the example
    boundaries from position_ids only in a batch of one row, and would otherwise let examples attend to each other."""
    return collate([join_rows(rows)] if args.join_packed_rows else rows, pad_id)


def train_step(model, optimizer, micro_batches, args, world, device) -> tuple[float, int]:
    model.train()        # dropout on, and gradient checkpointing, which transformers applies only in train mode
    tokens = all_sum(sum(answer_tokens(b) for b in micro_batches), device)
    loss_total = 0.0
    for batch in micro_batches:
        with autocast(args, device):
            loss_sum = forward_loss_sum(model, batch, args.batching_strategy, device)
        # FSDP averages gradients over ranks; scaling by world makes the result the mean over all tokens.
        (loss_sum * world / tokens).backward()
        loss_total += loss_sum.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_sum(loss_total, device) / tokens, sum(int(b["attention_mask"].sum()) for b in micro_batches)


@torch.no_grad()
def validate(model, rows, args, rank, world, device, pad_id) -> float:
    """Mean loss over every validation row, in eval mode (no dropout: the same weights give the same loss). The
    rows are dealt round-robin; since FSDP gathers weights in each forward pass, every rank runs as many passes
    as the others: one short of a row repeats one, uncounted."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for turn in range(math.ceil(len(rows) / world)):
        index = turn * world + rank
        batch = to_batch([rows[index % len(rows)]], args, pad_id)
        with autocast(args, device):
            loss = forward_loss_sum(model, batch, args.batching_strategy, device).item()
        if index < len(rows):
            loss_sum, tokens = loss_sum + loss, tokens + answer_tokens(batch)
    loss_sum, tokens = all_sum(loss_sum, device), all_sum(tokens, device)
    return loss_sum / tokens if tokens else float("nan")


# ------------------------------------------------------------------------------------------------ state

def resume_position(folder: Path, model, optimizer, shape: Shape, rank: int) -> dict:
    """The position of the newest checkpoint, loaded into the model and optimizer; a different number of ranks,
    micro-batch size or accumulation is fine, since the position counts rows of the epoch's order."""
    try:
        latest, note = checkpoints.load(folder, model, optimizer, rank)
    except checkpoints.CheckpointError as e:
        raise DataError(str(e)) from None
    if "rows" not in latest:
        raise DataError(f"{folder / checkpoints.LATEST} was written by an older finetuning.py (no global data "
                        "position): start the run over without --resume")
    if note:
        print(f"note: {note}", flush=True)
    if rank == 0:
        was = Shape(**latest["shape"])
        change = "" if was == shape else (f"; it was written by {was.world} rank(s) x batch {was.batch} x "
                                          f"{was.accumulate} accumulation, now {shape.world} x {shape.batch} x "
                                          f"{shape.accumulate}")
        print(f"resumed from {folder / latest['path']} at step {latest['step']}, row {latest['rows']} of epoch "
              f"{latest['epoch']}{change}", flush=True)
    return {key: latest[key] for key in ("step", "epoch", "rows", "epoch_loss", "epoch_steps")}


def start_wandb(args):
    """A Weights & Biases run on rank 0; wandb is imported only here, when --use_wandb asks for it."""
    try:
        import wandb
    except ImportError:
        raise DataError("--use_wandb needs the wandb package: pip install wandb (then wandb login)") from None
    return wandb.init(project=args.wandb_project, config=vars(args))


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


def write_metrics(folder: Path, metrics: dict):
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if metrics["steps"]:
        ax.plot([m["step"] for m in metrics["steps"]], [m["train_loss"] for m in metrics["steps"]], label="train")
    validated = [m for m in metrics["epochs"] if m.get("val_loss") is not None]
    if validated:
        ax.plot([m["step"] for m in validated], [m["val_loss"] for m in validated], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def train(args, rank, world, device):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    folder = Path(args.dist_checkpoint_root_folder) / args.dist_checkpoint_folder
    records = load_records(args.data_path)          # bad data fails before minutes of model loading
    args.compute_dtype, why = choose_precision(args, device)
    if rank == 0:
        threads = f", {torch.get_num_threads()} threads per process" if device.type == "cpu" else ""
        print(f"precision: {why}{threads}", flush=True)
    tokenizer, model = load_tokenizer_and_model(args, device, rank, world)
    train_rows, val_rows, train_enc, val_enc = build_rows(records, args, tokenizer, rank)
    if rank == 0:
        trained, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                          sum(p.numel() for p in model.parameters()))
        print(f"model: {args.model_name}, {trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained"
              + (" (LoRA)" if args.use_peft else ""), flush=True)
    model = shard(model, args, rank, world, device)
    # fused: one kernel for the whole update on CUDA (measured on an H100, 1B model: 35 ms -> 16 ms a step).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    tracker = start_wandb(args) if args.use_wandb and rank == 0 else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shape = Shape(world, args.batch_size_training, args.gradient_accumulation_steps)
    if steps_left(len(train_rows), 0, shape) == 0:
        raise DataError(f"{len(train_rows)} training rows are too few for {world} process(es) x batch "
                        f"{args.batch_size_training} x {args.gradient_accumulation_steps} accumulation steps: "
                        "add data or lower them")

    # Where the next step starts: the epoch, the rows of its order already consumed (by all ranks together) and the
    # epoch's loss so far, so that a run resumed inside an epoch reports the same epoch mean as an uninterrupted one.
    position = {"step": 0, "epoch": 0, "rows": 0, "epoch_loss": 0.0, "epoch_steps": 0}
    metrics = {"steps": [], "epochs": [], "truncated": train_enc.truncated + val_enc.truncated,
               "dropped": train_enc.dropped + val_enc.dropped}
    if args.resume and (folder / checkpoints.LATEST).exists():
        position = resume_position(folder, model, optimizer, shape, rank)
        if (folder / "metrics.json").exists():       # written after each checkpoint; absent if killed in between
            metrics = json.loads((folder / "metrics.json").read_text())
        metrics["steps"] = [m for m in metrics["steps"] if m["step"] <= position["step"]]
    elif rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        # What the converter needs besides the weights.
        tokenizer.save_pretrained(folder / "hf_meta")
        base = model.get_base_model() if args.use_peft else model
        base.config.save_pretrained(folder / "hf_meta")
        base.generation_config.save_pretrained(folder / "hf_meta")
        if args.use_peft:
            model.peft_config["default"].save_pretrained(folder / "hf_meta" / "lora")

    saved = {"step": None}          # the step last written: a step is never written twice (nor overwritten)

    def save():
        checkpoints.save(folder, model, optimizer, {**position, "shape": vars(shape)}, rank, args.keep_checkpoints)
        saved["step"] = position["step"]

    for epoch in range(position["epoch"], args.num_epochs):
        order = epoch_order(len(train_rows), args.seed + epoch)
        tokens_seen, started = 0, time.time()       # since the last log line
        while steps_left(len(order), position["rows"], shape):
            if args.max_steps and position["step"] >= args.max_steps:
                break
            micro = [to_batch([train_rows[i] for i in rows], args, pad_id)
                     for rows in step_micro_batches(order, position["rows"], shape, rank)]
            loss, tokens = train_step(model, optimizer, micro, args, world, device)
            tokens_seen += tokens
            position = {"step": position["step"] + 1, "epoch": epoch, "rows": position["rows"] + shape.rows_per_step,
                        "epoch_loss": position["epoch_loss"] + loss, "epoch_steps": position["epoch_steps"] + 1}
            if position["step"] % args.log_every == 0 or position["step"] == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rate = all_sum(tokens_seen, device) / (time.time() - started)
                tokens_seen, started = 0, time.time()
                metrics["steps"].append({"step": position["step"], "epoch": epoch, "train_loss": loss})
                if tracker:
                    tracker.log({"train_loss": loss, "tokens_per_s": rate}, step=position["step"])
                if rank == 0:
                    print(f"step {position['step']} epoch {epoch} loss {loss:.4f} | {rate:.0f} tokens/s since the last log | "
                          f"peak memory {peak_memory_mb(device):.0f} MB (rank 0)", flush=True)
            if args.save_checkpoints and args.save_every and position["step"] % args.save_every == 0:
                save()
                if rank == 0:
                    write_metrics(folder, metrics)
        else:
            # The epoch ran to its end: record it and start the next one at its first row.
            val_loss = validate(model, val_rows, args, rank, world, device, pad_id) if val_rows else None
            train_loss = position["epoch_loss"] / max(position["epoch_steps"], 1)
            metrics["epochs"].append({"epoch": epoch, "step": position["step"], "train_loss": train_loss,
                                      "train_perplexity": math.exp(train_loss), "val_loss": val_loss,
                                      "val_perplexity": math.exp(val_loss) if val_loss is not None else None})
            position = {"step": position["step"], "epoch": epoch + 1, "rows": 0, "epoch_loss": 0.0, "epoch_steps": 0}
            if tracker:
                tracker.log({k: v for k, v in metrics["epochs"][-1].items() if k != "step"}, step=position["step"])
            if rank == 0:
                print(f"epoch {epoch}: train loss {train_loss:.4f} (perplexity {math.exp(train_loss):.2f})"
                      + (f", validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})" if val_loss else ""),
                      flush=True)
            if args.save_checkpoints:
                save()
            if rank == 0:
                write_metrics(folder, metrics)
            continue
        break        # max_steps reached inside the epoch
    if position["rows"] and args.save_checkpoints and saved["step"] != position["step"]:
        save()                     # stopped inside an epoch: keep that point for --resume
    peaks = [None] * world
    dist.all_gather_object(peaks, round(peak_memory_mb(device)))
    if rank == 0:
        metrics["peak_memory_mb_rank0"], metrics["peak_memory_mb_per_rank"] = peaks[0], peaks
        write_metrics(folder, metrics)
        if tracker:
            tracker.finish()
        print(f"done: step {position['step']}, checkpoints in {folder}, metrics in {folder / 'metrics.json'}; "
              f"peak memory per rank {', '.join(f'{p} MB' for p in peaks)}", flush=True)
    dist.barrier()       # every rank leaves together: none tears down its process group while another still works


def say_once(message: str, rank: int):
    """Print a user error exactly once, from the first rank that meets it, before that rank exits. Every rank
    usually meets the same error; the first to exit makes torchrun stop the others, so the message cannot wait
    for rank 0. The ranks agree on who speaks through the rendezvous store, which outlives any collective."""
    mine = f"{rank}|{message}"
    try:
        store = dist.distributed_c10d._get_default_store()
        first = store.compare_set("raft-finetune/user-error", "", mine).decode()
    except Exception:         # no process group or no store: this process speaks for itself
        first = mine
    if first == mine:
        print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    # A rank that dies of a signal (SIGSEGV, SIGABRT from the C++ runtime) prints where its Python threads were:
    # on a cluster, that stack is the only trace of what stopped the run.
    faulthandler.enable()
    args = parse_args(argv)
    rank, world, device = init_distributed(args.cpu_threads)
    try:
        train(args, rank, world, device)
        return 0
    except (DataError, ConfigError, OSError) as e:
        say_once(str(e), rank)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
