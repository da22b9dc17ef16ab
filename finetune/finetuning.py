"""Fine-tune a chat model on RAFT data with FSDP2: one GPU, many GPUs, or CPU processes.

  # a recipe: every key of finetune/configs/*.yaml is also a flag of the same name, and the flag wins
  torchrun --nnodes 1 --nproc_per_node 8 finetune/finetuning.py --config finetune/configs/llama3_8b_full.yaml \
      --data_path output/raft.jsonl
  # the recipe's original command line works as it is (no --config: every other key takes its default)
  torchrun --nnodes 1 --nproc_per_node 8 finetune/finetuning.py --enable_fsdp --lr 1e-5 --context_length 8192 \
      --num_epochs 1 --batch_size_training 1 --model_name meta-llama/Meta-Llama-3-8B-Instruct \
      --dist_checkpoint_root_folder ./raft-8b --dist_checkpoint_folder fine-tuned \
      --dataset raft --data_path output/raft.jsonl --run_validation True
  # on a CPU, two processes over gloo (the demo's recipe); or one plain process: python finetune/finetuning.py ...
  torchrun --standalone --nproc_per_node 2 finetune/finetuning.py --config finetune/configs/cpu_demo.yaml ...

The run reads as a recipe: the settings (config.FINETUNE_SCHEMA) become a frozen RunPlan (model, precision,
packing, sharding: decided once, before any weight is loaded); Trainer.setup() loads the data and the model and
shards it, Trainer.train_epoch() runs one epoch, Trainer.finish() writes the last checkpoint and the metrics.

Each decoder layer, then the root, is sharded with fully_shard (FSDP2); NCCL on CUDA, gloo on CPU. Weights and
optimizer state stay fp32 ("master weights"); mixed_precision auto computes in bf16 where the hardware multiplies
it natively (a GPU with bf16, a CPU with AMX or AVX512-BF16) and in float32 elsewhere, where bf16 is emulated and
40x slower (hardware.py decides; the log says what it chose and why). pure_bf16 keeps the weights themselves in
bf16: with AdamW at lr 1e-5 the updates then vanish below bf16's resolution and the model does not learn.

Each epoch shuffles the rows once; an optimizer step takes the next world x batch x accumulation rows of that
order, dealt to the ranks. The loss is the mean over every answer token of an optimizer step, across
micro-batches and ranks, so that it does not depend on how the tokens are batched. Training steps run in train
mode (dropout, gradient checkpointing), validation in eval mode without gradients, on every rank.

Checkpoints (finetune/checkpoints.py) go to <root>/<folder>/step_N with the step, the data position in global terms
and the RNG state; the newest keep_checkpoints are kept. resume continues from the newest one with the same losses
as an uninterrupted run, on the same number of ranks or another one. finetune/checkpoint_converter.py turns one
into a Hugging Face folder. A user error is printed once, by the first rank that finds it, before any rank exits.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules

from config import EVAL_SCHEMA, FINETUNE_SCHEMA, load_config, load_recipe  # noqa: E402
from errors import ConfigError, DataError  # noqa: E402
from finetune import checkpoints  # noqa: E402
from finetune.raft_dataset import (IGNORE_INDEX, collate, encode, join_rows, load_records, pack,  # noqa: E402
                                   split_by_question, unpacked)
from hardware import compute_dtype, threads_per_process  # noqa: E402

# ------------------------------------------------------------------------------------------------ settings


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value}")


def mixed_precision_setting(value: str):
    """auto, or a boolean spelled as str2bool accepts it."""
    return "auto" if value.lower() == "auto" else str2bool(value)


def add_setting_flags(parser: argparse.ArgumentParser):
    """One flag per recipe key, same name. A boolean may be given bare (--enable_fsdp) or with a value
    (--run_validation False). Flags default to None: only the ones given override the recipe."""
    for name, key in FINETUNE_SCHEMA.items():
        if name == "mixed_precision":
            parser.add_argument(f"--{name}", type=mixed_precision_setting, help=key.help)
        elif key.kind is bool:
            parser.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, help=key.help)
        elif key.kind is list:
            parser.add_argument(f"--{name}", nargs="+", help=key.help)
        else:
            parser.add_argument(f"--{name}", type=key.kind, help=key.help)


def parse_args(argv=None) -> argparse.Namespace:
    """The run's settings: the recipe (--config), then the flags given, then the defaults of FINETUNE_SCHEMA."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a recipe: YAML with any FINETUNE_SCHEMA keys (finetune/configs/)")
    add_setting_flags(p)
    flags = vars(p.parse_args(argv))
    try:
        settings = load_recipe(flags.pop("config"), FINETUNE_SCHEMA, flags)
    except ConfigError as e:
        p.error(str(e))
    for required in ("model_name", "data_path"):
        if not settings[required]:
            p.error(f"--{required} is required (as a flag or in the --config recipe)")
    return argparse.Namespace(**settings)

# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Shape:
    """How many rows one optimizer step takes: ranks x rows per micro-batch x micro-batches."""
    world: int
    batch: int
    accumulate: int

    @property
    def rows_per_step(self) -> int:
        return self.world * self.batch * self.accumulate


@dataclass(frozen=True)
class RunPlan:
    """What the run does, decided once from the settings and the hardware, before any weight is loaded."""
    rank: int
    world: int
    device: torch.device
    shape: Shape
    folder: Path                  # <root>/<folder>: checkpoints, metrics, hf_meta
    compute_dtype: str            # "bfloat16" or "float32": the arithmetic of the forward and backward passes
    weights_dtype: torch.dtype    # bf16 only with pure_bf16; fp32 master weights otherwise
    precision_note: str           # the log line that says why
    attention: str                # sdpa, or flash_attention_2 with use_fast_kernels where it is installed
    join_packed_rows: bool        # flash attention sees example boundaries only in a batch of one row
    fsdp: bool

    @property
    def autocast(self) -> bool:
        """bf16 autocast for a model without FSDP; under FSDP its MixedPrecisionPolicy casts the weights instead."""
        return self.compute_dtype == "bfloat16" and not self.fsdp and self.weights_dtype != torch.bfloat16

    @property
    def fsdp_policy(self) -> MixedPrecisionPolicy:
        if self.compute_dtype == "bfloat16" and self.weights_dtype != torch.bfloat16:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()


def choose_precision(args, device) -> tuple[str, str]:
    """(compute dtype, the line that says why): bf16 only where asked for or native (hardware.compute_dtype)."""
    if args.pure_bf16:
        _, why = compute_dtype("bfloat16", device.type)
        return "bfloat16", f"bf16 weights and compute (--pure_bf16; {why})"
    asked = {True: "bfloat16", False: "float32"}.get(args.mixed_precision, args.mixed_precision)
    dtype, why = compute_dtype(asked, device.type)
    what = "bf16 compute, fp32 master weights" if dtype == "bfloat16" else "float32 compute and weights"
    return dtype, f"{what} (--mixed_precision {why})"


def attention_kind(args) -> str:
    if args.use_fast_kernels:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def plan_run(args, rank: int, world: int, device) -> RunPlan:
    if world > 1 and not args.enable_fsdp:
        raise DataError(f"{world} processes need --enable_fsdp")
    dtype, note = choose_precision(args, device)
    attention = attention_kind(args)
    return RunPlan(rank=rank, world=world, device=device,
                   shape=Shape(world, args.batch_size_training, args.gradient_accumulation_steps),
                   folder=Path(args.dist_checkpoint_root_folder) / args.dist_checkpoint_folder,
                   compute_dtype=dtype, weights_dtype=torch.bfloat16 if args.pure_bf16 else torch.float32,
                   precision_note=note, attention=attention,
                   join_packed_rows=attention == "flash_attention_2" and args.batching_strategy == "packing",
                   fsdp=args.enable_fsdp)

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


def load_tokenizer_and_model(args, plan: RunPlan):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
    source, gguf, weights = args.model_name, {}, {}
    if source.endswith(".gguf"):
        source, gguf = str(Path(source).parent), {"gguf_file": Path(source).name}
        # dequantize=True: a GGUF model otherwise stays marked quantized, untrainable and unsaveable.
        weights = {"quantization_config": GgufConfig(dequantize=True)}
    tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
    if plan.fsdp and plan.world > 1 and plan.rank > 0:
        # Only rank 0 reads the weights; the others build the same model on the meta device (no memory) and receive
        # their shards from rank 0 in shard(): a node holds one copy of the model in RAM, not one per process.
        config = AutoConfig.from_pretrained(source, **gguf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=plan.weights_dtype, attn_implementation=plan.attention)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=plan.weights_dtype, attn_implementation=plan.attention,
                                                     **gguf, **weights)
    model.config.use_cache = False     # a cache in training also hides packed rows from the attention mask
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.use_peft:
        model = add_lora(model, args)
    # With FSDP, fully_shard moves each shard to the device; without it, the whole model goes there now.
    return tokenizer, model if plan.fsdp else model.to(plan.device)


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


def shard(model, plan: RunPlan):
    if not plan.fsdp:
        return model
    full_state = model.state_dict() if plan.rank == 0 and plan.world > 1 else {}     # rank 0 keeps them until sent
    mesh = init_device_mesh(plan.device.type, (plan.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=plan.fsdp_policy)
    fully_shard(model, mesh=mesh, mp_policy=plan.fsdp_policy)
    if plan.world > 1:
        if plan.rank > 0:
            model.to_empty(device=plan.device)    # memory for this rank's shards, filled from rank 0 below
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():            # e.g. rotary frequencies: buffers no state dict carries
            dist.broadcast(buffer, src=0)
    return model


@dataclass
class Rows:
    """The training and validation rows, and how many examples were cut or dropped to fit the context."""
    train: list
    val: list
    truncated: int
    dropped: int


def build_rows(records, args, tokenizer, rank) -> Rows:
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
    return Rows(to_rows(train.examples, args.context_length), to_rows(val.examples, args.context_length),
                train.truncated + val.truncated, train.dropped + val.dropped)


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


def autocast(plan: RunPlan):
    return torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=plan.autocast)


def to_batch(rows: list[dict], plan, pad_id: int) -> dict:
    """A micro-batch as tensors. For flash attention, packed rows go end to end in one row: it finds the example
    boundaries from position_ids only in a batch of one row, and would otherwise let examples attend to each other."""
    return collate([join_rows(rows)] if plan.join_packed_rows else rows, pad_id)


def train_step(model, optimizer, micro_batches, strategy: str, plan: RunPlan) -> tuple[float, int]:
    """One optimizer step: (the mean loss over every answer token of the step on all ranks, tokens this rank read)."""
    model.train()        # dropout on, and gradient checkpointing, which transformers applies only in train mode
    tokens = all_sum(sum(answer_tokens(b) for b in micro_batches), plan.device)
    loss_total = 0.0
    for batch in micro_batches:
        with autocast(plan):
            loss_sum = forward_loss_sum(model, batch, strategy, plan.device)
        # FSDP averages gradients over ranks; scaling by world makes the result the mean over all tokens.
        (loss_sum * plan.world / tokens).backward()
        loss_total += loss_sum.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_sum(loss_total, plan.device) / tokens, sum(int(b["attention_mask"].sum()) for b in micro_batches)


@torch.no_grad()
def validate(model, rows, strategy: str, plan: RunPlan, pad_id) -> float:
    """Mean loss over every validation row, in eval mode (no dropout: the same weights give the same loss). The
    rows are dealt round-robin; since FSDP gathers weights in each forward pass, every rank runs as many passes
    as the others: one short of a row repeats one, uncounted."""
    model.eval()
    loss_sum, tokens = 0.0, 0
    for turn in range(math.ceil(len(rows) / plan.world)):
        index = turn * plan.world + plan.rank
        batch = to_batch([rows[index % len(rows)]], plan, pad_id)
        with autocast(plan):
            loss = forward_loss_sum(model, batch, strategy, plan.device).item()
        if index < len(rows):
            loss_sum, tokens = loss_sum + loss, tokens + answer_tokens(batch)
    loss_sum, tokens = all_sum(loss_sum, plan.device), all_sum(tokens, plan.device)
    return loss_sum / tokens if tokens else float("nan")

# ------------------------------------------------------------------------------------------------ outputs


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


def save_hf_meta(folder: Path, tokenizer, model, use_peft: bool):
    """What the converter needs besides the weights: config, tokenizer, generation config (and the LoRA config)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "hf_meta")
    base = model.get_base_model() if use_peft else model
    base.config.save_pretrained(folder / "hf_meta")
    base.generation_config.save_pretrained(folder / "hf_meta")
    if use_peft:
        model.peft_config["default"].save_pretrained(folder / "hf_meta" / "lora")


def start_wandb(args):
    """A Weights & Biases run on rank 0; wandb is imported only here, when use_wandb asks for it."""
    try:
        import wandb
    except ImportError:
        raise DataError("--use_wandb needs the wandb package: pip install wandb (then wandb login)") from None
    return wandb.init(project=args.wandb_project, config=vars(args))

# ------------------------------------------------------------------------------------------------ the recipe


@dataclass(frozen=True)
class Position:
    """Where the next step starts: the epoch, the rows of its order already consumed (by all ranks together) and the
    epoch's loss so far, so that a run resumed inside an epoch reports the same epoch mean as an uninterrupted one."""
    step: int = 0
    epoch: int = 0
    rows: int = 0
    epoch_loss: float = 0.0
    epoch_steps: int = 0


@dataclass
class Trainer:
    args: argparse.Namespace
    plan: RunPlan
    position: Position = field(default_factory=Position)
    metrics: dict = field(default_factory=lambda: {"steps": [], "epochs": []})
    saved_step: Optional[int] = None      # the step last written: a step is never written twice (nor overwritten)

    def setup(self):
        """Data (bad data fails before minutes of model loading), model, shards, optimizer, and the position to
        start from (a checkpoint's, with resume)."""
        args, plan = self.args, self.plan
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        records = load_records(args.data_path)
        self.say(f"precision: {plan.precision_note}"
                 + (f", {torch.get_num_threads()} threads per process" if plan.device.type == "cpu" else ""))
        self.tokenizer, model = load_tokenizer_and_model(args, plan)
        self.rows = build_rows(records, args, self.tokenizer, plan.rank)
        trained, total = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                          sum(p.numel() for p in model.parameters()))
        self.say(f"model: {args.model_name}, {trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained"
                 + (" (LoRA)" if args.use_peft else ""))
        self.model = shard(model, plan)
        # fused: one kernel for the whole update on CUDA (measured on an H100, 1B model: 35 ms -> 16 ms a step).
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                           weight_decay=args.weight_decay, fused=plan.device.type == "cuda")
        self.tracker = start_wandb(args) if args.use_wandb and plan.rank == 0 else None
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        if steps_left(len(self.rows.train), 0, plan.shape) == 0:
            raise DataError(f"{len(self.rows.train)} training rows are too few for {plan.world} process(es) x batch "
                            f"{args.batch_size_training} x {args.gradient_accumulation_steps} accumulation steps: "
                            "add data or lower them")
        self.metrics.update(truncated=self.rows.truncated, dropped=self.rows.dropped)
        if args.resume and (plan.folder / checkpoints.LATEST).exists():
            self.resume()
        elif plan.rank == 0:
            save_hf_meta(plan.folder, self.tokenizer, model, args.use_peft)

    def resume(self):
        """The newest checkpoint's weights, optimizer state and position; a different number of ranks, micro-batch
        size or accumulation is fine, since the position counts rows of the epoch's order."""
        plan = self.plan
        latest, note = checkpoints.load(plan.folder, self.model, self.optimizer, plan.rank)
        if "rows" not in latest:
            raise DataError(f"{plan.folder / checkpoints.LATEST} was written by an older finetuning.py (no global "
                            "data position): start the run over without --resume")
        if note:
            print(f"note: {note}", flush=True)
        was = Shape(**latest["shape"])
        change = "" if was == plan.shape else (
            f"; it was written by {was.world} rank(s) x batch {was.batch} x {was.accumulate} accumulation, now "
            f"{plan.shape.world} x {plan.shape.batch} x {plan.shape.accumulate}")
        self.say(f"resumed from {plan.folder / latest['path']} at step {latest['step']}, row {latest['rows']} of "
                 f"epoch {latest['epoch']}{change}")
        self.position = Position(**{key: latest[key] for key in ("step", "epoch", "rows", "epoch_loss", "epoch_steps")})
        if (plan.folder / "metrics.json").exists():       # written after each checkpoint; absent if killed in between
            self.metrics = json.loads((plan.folder / "metrics.json").read_text())
        self.metrics["steps"] = [m for m in self.metrics["steps"] if m["step"] <= self.position.step]

    def train(self):
        for epoch in range(self.position.epoch, self.args.num_epochs):
            if not self.train_epoch(epoch):
                break                  # max_steps reached inside the epoch
            self.end_epoch(epoch)

    def train_epoch(self, epoch: int) -> bool:
        """The epoch's remaining steps; False when max_steps stopped it before its end."""
        args, plan = self.args, self.plan
        order = epoch_order(len(self.rows.train), args.seed + epoch)
        meter = {"tokens": 0, "since": time.time()}        # throughput since the last log line
        while steps_left(len(order), self.position.rows, plan.shape):
            if args.max_steps and self.position.step >= args.max_steps:
                return False
            micro = [to_batch([self.rows.train[i] for i in rows], plan, self.pad_id)
                     for rows in step_micro_batches(order, self.position.rows, plan.shape, plan.rank)]
            loss, tokens = train_step(self.model, self.optimizer, micro, args.batching_strategy, plan)
            meter["tokens"] += tokens
            p = self.position
            self.position = Position(p.step + 1, epoch, p.rows + plan.shape.rows_per_step, p.epoch_loss + loss,
                                     p.epoch_steps + 1)
            if self.position.step % args.log_every == 0 or self.position.step == 1:
                self.log_step(epoch, loss, meter)
            if args.save_checkpoints and args.save_every and self.position.step % args.save_every == 0:
                self.save()
        return True

    def log_step(self, epoch: int, loss: float, meter: dict):
        plan = self.plan
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        rate = all_sum(meter["tokens"], plan.device) / (time.time() - meter["since"])
        meter.update(tokens=0, since=time.time())
        step = self.position.step
        self.metrics["steps"].append({"step": step, "epoch": epoch, "train_loss": loss})
        if self.tracker:
            self.tracker.log({"train_loss": loss, "tokens_per_s": rate}, step=step)
        self.say(f"step {step} epoch {epoch} loss {loss:.4f} | {rate:.0f} tokens/s since the last log | "
                 f"peak memory {peak_memory_mb(plan.device):.0f} MB (rank 0)")

    def end_epoch(self, epoch: int):
        """The epoch ran to its end: validate, record it, checkpoint, and start the next one at its first row."""
        rows = self.rows.val
        val_loss = validate(self.model, rows, self.args.batching_strategy, self.plan, self.pad_id) if rows else None
        train_loss = self.position.epoch_loss / max(self.position.epoch_steps, 1)
        self.metrics["epochs"].append({"epoch": epoch, "step": self.position.step, "train_loss": train_loss,
                                       "train_perplexity": math.exp(train_loss), "val_loss": val_loss,
                                       "val_perplexity": math.exp(val_loss) if val_loss is not None else None})
        self.position = Position(self.position.step, epoch + 1)
        if self.tracker:
            self.tracker.log({k: v for k, v in self.metrics["epochs"][-1].items() if k != "step"},
                             step=self.position.step)
        self.say(f"epoch {epoch}: train loss {train_loss:.4f} (perplexity {math.exp(train_loss):.2f})"
                 + (f", validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})" if val_loss else ""))
        if self.args.save_checkpoints:
            self.save()
        elif self.plan.rank == 0:
            write_metrics(self.plan.folder, self.metrics)

    def save(self):
        """A checkpoint of this step (every rank), then the metrics that go with it (rank 0)."""
        position = {**vars(self.position), "shape": vars(self.plan.shape)}
        checkpoints.save(self.plan.folder, self.model, self.optimizer, position, self.plan.rank,
                         self.args.keep_checkpoints)
        self.saved_step = self.position.step
        if self.plan.rank == 0:
            write_metrics(self.plan.folder, self.metrics)

    def finish(self):
        """Keep a point stopped inside an epoch for resume; the peak memory of every rank; the final metrics."""
        plan = self.plan
        if self.position.rows and self.args.save_checkpoints and self.saved_step != self.position.step:
            self.save()
        peaks = [None] * plan.world
        dist.all_gather_object(peaks, round(peak_memory_mb(plan.device)))
        if plan.rank == 0:
            self.metrics["peak_memory_mb_rank0"], self.metrics["peak_memory_mb_per_rank"] = peaks[0], peaks
            plan.folder.mkdir(parents=True, exist_ok=True)
            write_metrics(plan.folder, self.metrics)
            if self.tracker:
                self.tracker.finish()
        self.say(f"done: step {self.position.step}, checkpoints in {plan.folder}, metrics in "
                 f"{plan.folder / 'metrics.json'}; peak memory per rank {', '.join(f'{p} MB' for p in peaks)}")
        dist.barrier()     # every rank leaves together: none tears down its process group while another still works

    def say(self, line: str):
        if self.plan.rank == 0:
            print(line, flush=True)


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
        trainer = Trainer(args, plan_run(args, rank, world, device))
        trainer.setup()
        trainer.train()
        trainer.finish()
        return 0
    except (DataError, ConfigError, OSError) as e:
        say_once(str(e), rank)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
