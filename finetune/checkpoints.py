"""The checkpoint folder of a fine-tuning run: what is in it, how it is written, read back and pruned.

  <root>/<folder>/step_N/       one torch.distributed.checkpoint shard per rank (model + optimizer), the RNG state
                                of each rank, position.json (where the data stands)
  <root>/<folder>/latest.json   the newest complete step: {"path": "step_N", ...position}
  <root>/<folder>/hf_meta/      config, tokenizer and generation config for the converter

latest.json is replaced atomically (a temporary file, then a rename) only after every rank's shard is on disk, so
a run killed while writing leaves the previous checkpoint usable. The position is global (rows of the epoch's
order and optimizer steps consumed), not per rank, so a run stopped on 8 ranks resumes on 4 (DCP reshards the
model and the optimizer state). Older steps beyond --keep_checkpoints are deleted: an 8B full fine-tune checkpoint
with its optimizer state is about 96 GB.
"""
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from errors import CheckpointError

LATEST = "latest.json"


def write_json_atomically(path: Path, value: dict):
    """A reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


def read_latest(folder: Path) -> dict:
    """latest.json of a run folder: {"path": "step_N", ...position}, checked against the folder's contents."""
    path = Path(folder) / LATEST
    try:
        latest = json.loads(path.read_text())
        step = Path(folder) / latest["path"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: {folder} holds no finished checkpoint") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}): write {{\"path\": \"step_N\"}} into it for the "
                              f"step to use (one of: {', '.join(step_folders(folder)) or 'none'}), or start over "
                              "without --resume") from None
    if not (step / ".metadata").exists():
        raise CheckpointError(f"{path} points to {step}, which is not a complete checkpoint: point it at another "
                              f"step (one of: {', '.join(step_folders(folder)) or 'none'}) or start over without --resume")
    return latest


def step_folders(folder: Path) -> list[str]:
    """The step_N folders of a run, oldest first."""
    found = [p.name for p in Path(folder).glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda name: int(name.split("_")[1]))


def save(folder: Path, model, optimizer, position: dict, rank: int, keep: int):
    """Every rank writes its shard and RNG state; rank 0 then records the step in latest.json and prunes."""
    target = folder / f"step_{position['step']}"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               target / f"rng_rank{rank}.pt")
    dist.barrier()                  # every shard is on disk before the step becomes the latest
    if rank == 0:
        write_json_atomically(target / "position.json", position)
        write_json_atomically(folder / LATEST, {"path": target.name, **position})
        prune(folder, keep)
    dist.barrier()                  # nobody goes on (or reads latest.json) before it is written


def prune(folder: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` steps (0 keeps every one); never the one latest.json names."""
    if keep <= 0:
        return []
    latest = json.loads((folder / LATEST).read_text())["path"]
    doomed = [name for name in step_folders(folder)[:-keep] if name != latest]
    for name in doomed:
        shutil.rmtree(folder / name, ignore_errors=True)
    return doomed


def load(folder: Path, model, optimizer, rank: int) -> tuple[dict, Optional[str]]:
    """Load the newest checkpoint into the model and optimizer (any number of ranks); returns the position and a
    note when this rank had no RNG state of its own (the checkpoint was written by fewer ranks)."""
    latest = read_latest(folder)
    target = folder / latest["path"]
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(target))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = target / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        return latest, f"no RNG state for rank {rank} in {target}: it starts from a fresh seed"
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return latest, None
