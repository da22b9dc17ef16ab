"""Chat with the fine-tuned model over your documents: retrieval, the RAFT prompt, the answer as it is written.

  python chat.py -u http://localhost:8000/v1 -m raft-8b                # a vLLM / llama.cpp server
  python chat.py --model_path output/demo/hf                           # no server: transformers in this process
  python chat.py -u http://localhost:8000/v1 --question "What is RAFT?" --json   # one shot, for scripts

Each question goes through the same retriever and RAG prompt as the evaluation (raft_eval_config.yaml, -c): the
top -r chunks of the documents become the <DOCUMENT>s of the prompt. The reply streams in; by default only the
part after <ANSWER>: is shown (--show-reasoning shows the chain of thought, --sources the retrieved chunks).
When the model declines (raft.yaml's refusal answer, or "I don't know"), chat.py says so and prints a line
starting with "[handoff]", so a person can take over; in one-shot mode the exit code is then 3, and --json
sets "handoff": true. An empty line asks again; Ctrl-C stops the current answer; Ctrl-D or "exit" quits.
"""
import argparse
import json
import re
import sys
import threading
from pathlib import Path

import metrics
from config import EVAL_SCHEMA, RAFT_SCHEMA, ConfigError, fill_prompt, load_config, load_config_with_flags
from hardware import compute_dtype, torch_dtype
from llm_client import LLMFatalError, add_client_flags, client_from_config, connect, public_host
from raft_utils import InputError, final_answer, instruction, load_chunks
from retrieval import build_retriever

DEFAULT_URL = "http://localhost:8000/v1"
HANDOFF = "[handoff] The documents do not answer this question: please pass it to a person."
EXIT_HANDOFF = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="raft_eval_config.yaml", help="retrieval and prompt settings")
    p.add_argument("-u", "--url", default=DEFAULT_URL, help=f"API base URL of the model (default {DEFAULT_URL})")
    p.add_argument("-m", "--model", help="served model name (default: the only model at -u)")
    p.add_argument("--model_path", help="a Hugging Face model folder to run in this process instead of a server")
    p.add_argument("-r", "--topk", type=int, help="chunks retrieved per question (default: rag_topk's first value)")
    p.add_argument("-d", "--data_dir", help="documents folder")
    p.add_argument("--chunk_size", type=int, help="characters per chunk (keep it equal to raft.py's)")
    p.add_argument("--retriever", help="hybrid, dense or bm25")
    p.add_argument("--no-rag", dest="rag", action="store_false", help="ask the model without retrieved documents")
    p.add_argument("--show-reasoning", action="store_true", help="show the whole reply, chain of thought included")
    p.add_argument("--sources", action="store_true", help="list the retrieved chunks' sources after each answer")
    p.add_argument("--question", help="answer this one question and exit (exit code 3: handed off)")
    p.add_argument("--json", action="store_true", help="with --question: print one JSON object instead of text")
    p.add_argument("--max_tokens", type=int, dest="answer_max_tokens", help="longest reply, in tokens")
    add_client_flags(p)
    return p.parse_args(argv)


# ---- where replies come from ----------------------------------------------------------------------------------
class ServerModel:
    """An OpenAI-compatible server, through the shared client."""

    def __init__(self, cfg, args):
        # One retry at most: a person is waiting for the answer.
        self.client = client_from_config(cfg, args, [args.url], args.model, None, max_retries=min(1, cfg["max_retries"]))
        self.name = connect(self.client, args)
        self.where = public_host(args.url)

    def stream(self, messages, params):
        return self.client.stream(messages, params)

    def close(self):
        self.client.close()


class LocalModel:
    """A Hugging Face folder run with transformers in this process (no server needed; slower)."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        # bf16 only where the hardware has it: a bf16 checkpoint run as saved crawls on a CPU without bf16 units.
        self.dtype, self.dtype_reason = compute_dtype("auto")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(self.dtype)).eval()
        except (OSError, ValueError) as e:
            raise InputError(f"--model_path {path} is not a Hugging Face model folder ({str(e).splitlines()[0]})") from None
        if not self.tokenizer.chat_template:
            raise InputError(f"--model_path {path}: the tokenizer has no chat template")
        self.name, self.where = Path(path).name, f"this process, {self.dtype}"

    def stream(self, messages, params):
        from transformers import StoppingCriteria, TextIteratorStreamer
        stop = threading.Event()

        class Stop(StoppingCriteria):       # lets Ctrl-C end the generation thread too
            def __call__(self, *args, **kwargs):
                return stop.is_set()
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": params["temperature"]} if params["temperature"] > 0 \
            else {"do_sample": False}
        thread = threading.Thread(target=self.model.generate, daemon=True, kwargs=dict(
            **inputs, max_new_tokens=params["max_tokens"], streamer=streamer, stopping_criteria=[Stop()], **sampling))
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()
            thread.join()     # a generation thread still running at exit aborts the interpreter

    def close(self):
        pass


# ---- one question ---------------------------------------------------------------------------------------------
class Assistant:
    """Retrieval and prompts, read from the evaluation's config: the model sees what it was trained and tested on."""

    def __init__(self, cfg, topk: int, rag: bool):
        self.cfg, self.topk, self.rag = cfg, topk, rag
        self.refusal_answer = load_config(cfg["raft_config"], RAFT_SCHEMA)["refusal_answer"]
        self.chunks = []
        if rag:
            _, self.chunks, _ = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"], cfg["chunk_size"])
            self.retriever = build_retriever(self.chunks, cfg["retriever"], cfg["embedding_model"],
                                             cfg["index_cache"] or None, cfg["embedding_batch_size"],
                                             cfg["embedding_dtype"])
        self.params = {"temperature": cfg["temperature"], "max_tokens": cfg["answer_max_tokens"]}

    def prompt(self, question: str) -> tuple[list[dict], list[dict]]:
        """(chat messages, retrieved sources)."""
        if not self.rag:
            return fill_prompt(self.cfg["model_prompt"], question=question), []
        ranking = self.retriever.rank([question], min(self.topk, len(self.chunks)))[0]
        docs = [self.chunks[i] for i in ranking]
        sources = [{"rank": r, "source": c.source, "text": c.text} for r, c in enumerate(docs, 1)]
        return fill_prompt(self.cfg["rag_prompt"], instruction=instruction([c.text for c in docs], question)), sources


class AnswerPrinter:
    """Prints a streamed reply: everything with --show-reasoning, else only what follows <ANSWER>: (the whole
    reply at the end when the model never wrote the marker, as a base model does not)."""
    MARK = re.compile(r"<ANSWER>\s*:")

    def __init__(self, show_reasoning: bool, out):
        self.show_reasoning, self.out = show_reasoning, out
        self.reply, self.printed = "", 0       # printed: how much of the answer part is on screen

    def feed(self, piece: str):
        self.reply += piece
        if self.show_reasoning:
            self.out.write(piece)
        else:
            mark = self.MARK.search(self.reply)
            if not mark:
                return
            answer = self.reply[mark.end():].lstrip()
            self.out.write(answer[self.printed:])
            self.printed = len(answer)
        self.out.flush()

    def finish(self):
        if not self.show_reasoning and not self.MARK.search(self.reply):
            self.out.write(metrics.answer_text(self.reply))
        self.out.write("\n")
        self.out.flush()


def ask(assistant: Assistant, model, question: str, show_reasoning: bool, out) -> dict:
    """Stream one answer to `out` (None: print nothing) and return what a caller needs to know about it."""
    messages, sources = assistant.prompt(question)
    printer = AnswerPrinter(show_reasoning, out) if out else None
    reply = ""
    for piece in model.stream(messages, assistant.params):
        reply += piece
        if printer:
            printer.feed(piece)
    if printer:
        printer.finish()
    answer = metrics.answer_text(reply)
    refused = metrics.is_refusal(answer, assistant.refusal_answer)
    return {"question": question, "answer": answer, "reply": reply, "answer_marked": final_answer(reply) is not None,
            "handoff": refused, "sources": sources}


def print_sources(sources, out):
    for s in sources:
        snippet = " ".join(s["text"].split())[:90]
        out.write(f"  [{s['rank']}] {s['source']}: {snippet}…\n")


def one_shot(assistant, model, args) -> int:
    result = ask(assistant, model, args.question, args.show_reasoning, None if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"model": model.name, **result}, ensure_ascii=False))
    else:
        if args.sources:
            print_sources(result["sources"], sys.stdout)
        if result["handoff"]:
            print(HANDOFF)
    return EXIT_HANDOFF if result["handoff"] else 0


def interactive(assistant, model, args) -> int:
    where = f"retrieval: {assistant.cfg['retriever']} top-{assistant.topk} over {len(assistant.chunks)} chunks" \
        if assistant.rag else "no retrieval"
    print(f"RAFT chat with {model.name} ({model.where}; {where}). Ctrl-D or 'exit' quits, Ctrl-C stops an answer.")
    while True:
        try:
            question = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if question.lower() in ("exit", "quit"):
            return 0
        if not question:
            continue
        sys.stdout.write("bot> ")
        try:
            result = ask(assistant, model, question, args.show_reasoning, sys.stdout)
        except KeyboardInterrupt:
            print("\n(stopped)")
            continue
        except LLMFatalError as e:
            print(f"\nerror: {e}")
            continue
        if args.sources:
            print_sources(result["sources"], sys.stdout)
        if result["handoff"]:
            print(HANDOFF)


def run(args) -> int:
    cfg = load_config_with_flags(args.config, EVAL_SCHEMA, args)
    if args.json and not args.question:
        raise ConfigError("--json needs --question (one-shot mode)")
    topk = args.topk or cfg["rag_topk"][0]
    if topk < 1:
        raise ConfigError(f"-r must be 1 or more, got {topk}")
    assistant = Assistant(cfg, topk, args.rag)
    model = LocalModel(args.model_path) if args.model_path else ServerModel(cfg, args)
    try:
        return one_shot(assistant, model, args) if args.question else interactive(assistant, model, args)
    finally:
        model.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, InputError, LLMFatalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
