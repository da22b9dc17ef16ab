"""Turn a sharded checkpoint written by finetuning.py into a Hugging Face folder that transformers and vLLM load.

  python finetune/checkpoint_converter.py --fsdp_checkpoint_path raft-8b/fine-tuned --consolidated_model_path raft-8b/hf

--fsdp_checkpoint_path is the run's folder (<root>/<folder>: its newest checkpoint is taken) or one step_N inside
it. The output holds safetensors weights, config, tokenizer (with its chat template) and generation config.
Runs in one plain process: torch.distributed.checkpoint reads every rank's shard without a process group.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def locate(path: Path) -> tuple[Path, Path]:
    """(step folder, folder with the config and tokenizer saved at the start of training)."""
    if (path / "latest.json").exists():
        return path / json.loads((path / "latest.json").read_text())["path"], path / "hf_meta"
    if (path / ".metadata").exists():
        return path, path.parent / "hf_meta"
    raise FileNotFoundError(f"{path} is neither a fine-tuning folder (no latest.json) nor a checkpoint step "
                            "(no .metadata): pass <dist_checkpoint_root_folder>/<dist_checkpoint_folder>")


def convert(checkpoint: str, output: str, dtype: str = "auto") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    step, meta = locate(Path(checkpoint))
    config = AutoConfig.from_pretrained(meta)
    # Build the model without memory, then give it exactly one copy of the weights: the checkpoint's.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: torch.empty(t.shape, dtype=torch.float32) for name, t in model.state_dict().items()}
    with warnings.catch_warnings():       # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(step))
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    target_dtype = DTYPES[dtype] or getattr(config, "dtype", None) or torch.float32
    model = model.to(target_dtype if isinstance(target_dtype, torch.dtype) else getattr(torch, str(target_dtype)))
    out = Path(output)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(meta).save_pretrained(out)
    GenerationConfig.from_pretrained(meta).save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdp_checkpoint_path", required=True)
    p.add_argument("--consolidated_model_path", required=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' type; auto: the model's own")
    args = p.parse_args(argv)
    try:
        out = convert(args.fsdp_checkpoint_path, args.consolidated_model_path, args.dtype)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a Hugging Face model folder to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
