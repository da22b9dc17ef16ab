"""Answering one question over the documents, for every face of the chatbot: the terminal (chat.py), the web page
(web_chat.py) and the RAG endpoint (rag_server.py).

  assistant = Assistant(cfg, topk=5, rag=True)          # the retriever and the prompts of raft_eval_config.yaml
  turn = assistant.start("Which port does vLLM use?")   # retrieval: turn.messages, turn.sources
  for piece in assistant.stream(turn, model):           # the reply as the model writes it
      show(turn.visible(show_reasoning=False))          # what a person should see of it so far
  result = assistant.finish(turn)                       # answer part, hand-off flag, sources

The model sees exactly what it was trained and evaluated on: the same retriever and chunking, the same rag_prompt.
A person sees the part after <ANSWER>: (the chain of thought on request); a reply that declines (raft.yaml's
refusal answer, or "I don't know") is a hand-off to a person. Every face may serve several people at once:
each reply gets its own connection to the model server, and a model in this process answers one at a time.
"""
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import metrics
from cli import client_from_config, connect
from config import fill_prompt
from documents import load_chunks
from errors import GenerationError, InputError
from hardware import compute_dtype, torch_dtype
from llm_client import ChatClient, public_host
from raft_utils import instruction
from rerank import with_reranker
from retrieval import build_retriever, settings_from_config
from refusal import is_refusal
from text import ANSWER_MARK, final_answer


# ---- where replies come from ----------------------------------------------------------------------------------
class ServerModel:
    """An OpenAI-compatible server, through the shared client: checked once, then one short-lived client per reply,
    so that replies streamed for different people never share an event loop."""

    def __init__(self, cfg, args):
        self.cfg, self.args = cfg, args
        checked = self._client(args.model)
        try:
            self.name = connect(checked, args)
        finally:
            checked.close()
        self.where = public_host(args.url)

    def _client(self, model: str) -> ChatClient:
        # One retry at most: a person is waiting for the answer.
        return client_from_config(self.cfg, self.args, [self.args.url], model, None,
                                  max_retries=min(1, self.cfg["max_retries"]))

    def stream(self, messages, params) -> Iterator[str]:
        client = self._client(self.name)
        try:
            yield from client.stream(messages, params)
        finally:
            client.close()

    def close(self):
        pass


class LocalModel:
    """A Hugging Face folder run with transformers in this process (no server needed; slower). One reply at a
    time: a CPU has nothing to gain from two generations fighting over its cores."""

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
        self.lock = threading.Lock()

    def stream(self, messages, params) -> Iterator[str]:
        """The reply's pieces. A generation that fails (inf or NaN logits from a tiny temperature, a prompt too long
        to allocate) ends its stream with a GenerationError instead of leaving it waiting forever; the lock is
        released either way, and closing the stream early (Ctrl-C, a client gone) stops the generation."""
        from transformers import StoppingCriteria, TextIteratorStreamer
        stop, failure = threading.Event(), []

        class Stop(StoppingCriteria):       # lets Ctrl-C (or a closed page) end the generation thread too
            def __call__(self, *args, **kwargs):
                return stop.is_set()
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": params["temperature"]} if params["temperature"] > 0 \
            else {"do_sample": False}

        def generate():
            try:
                self.model.generate(**inputs, max_new_tokens=params["max_tokens"], streamer=streamer,
                                    stopping_criteria=[Stop()], **sampling)
            except Exception as e:            # noqa: BLE001 -- any failure must end the stream, not hang it
                failure.append(e)
                streamer.end()
        with self.lock:
            thread = threading.Thread(target=generate, daemon=True)
            thread.start()
            try:
                yield from streamer
            finally:
                stop.set()
                thread.join()     # a generation thread still running at exit aborts the interpreter
        if failure:
            raise GenerationError(f"the model failed while answering ({type(failure[0]).__name__}: "
                                  f"{str(failure[0]).splitlines()[0][:200] if str(failure[0]) else 'no message'})")

    def close(self):
        pass


def open_model(cfg, args):
    """The model behind every face: --model_path in this process, else the server at -u."""
    return LocalModel(args.model_path) if args.model_path else ServerModel(cfg, args)


# ---- one question ---------------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One question and its reply as it grows."""
    question: str
    messages: list
    sources: list               # [{"rank", "source", "text"}], best first
    reply: str = ""
    started: float = field(default_factory=time.time)

    def visible(self, show_reasoning: bool, finished: bool = False) -> str:
        """What a person should see of the reply so far: all of it with the reasoning, else the part after
        <ANSWER>: (the whole reply once finished, when the model never wrote the marker, as a base model does)."""
        if show_reasoning:
            return self.reply
        mark = ANSWER_MARK.search(self.reply)
        if mark:
            return self.reply[mark.end():].lstrip()
        return metrics.answer_text(self.reply) if finished else ""


class Assistant:
    """Retrieval and prompts, read from the evaluation's config: the model sees what it was trained and tested on."""

    def __init__(self, cfg, topk: int, rag: bool, rerank_client: Optional[ChatClient] = None):
        self.cfg, self.topk, self.rag = cfg, topk, rag
        self.refusal_answer = cfg["refusal_answer"]
        self.chunks = []
        self.lock = threading.Lock()        # one retrieval at a time: the embedding model (and a reranker) is shared
        if rag:
            _, self.chunks, _ = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"], cfg["chunk_size"])
            self.retriever = with_reranker(build_retriever(self.chunks, cfg["retriever"], cfg["embedding_model"],
                                                           cfg["index_cache"] or None, cfg["embedding_batch_size"],
                                                           cfg["embedding_dtype"], settings_from_config(cfg)),
                                           self.chunks, cfg, rerank_client)
        self.params = {"temperature": cfg["temperature"], "max_tokens": cfg["answer_max_tokens"]}

    def describe(self) -> str:
        if not self.rag:
            return "no retrieval"
        reranked = "" if self.cfg["reranker"] == "none" else f", reranked by {self.cfg['reranker']}"
        return (f"retrieval: {self.cfg['retriever']}{reranked} top-{self.topk} over {len(self.chunks)} chunks of "
                f"{self.cfg['chunk_size']} characters, as in {self.cfg['sources_from']}")

    def start(self, question: str) -> Turn:
        """The question's prompt: the top-k chunks as <DOCUMENT>s (or the bare question without retrieval)."""
        if not self.rag:
            return Turn(question, fill_prompt(self.cfg["model_prompt"], question=question), [])
        with self.lock:
            ranking = self.retriever.rank([question], min(self.topk, len(self.chunks)))[0]
        docs = [self.chunks[i] for i in ranking]
        sources = [{"rank": r, "source": c.source, "text": c.text} for r, c in enumerate(docs, 1)]
        messages = fill_prompt(self.cfg["rag_prompt"], instruction=instruction([c.text for c in docs], question))
        return Turn(question, messages, sources)

    def stream(self, turn: Turn, model, params: Optional[dict] = None) -> Iterator[str]:
        """The reply's pieces as the model writes them; each is also added to turn.reply."""
        for piece in model.stream(turn.messages, {**self.params, **(params or {})}):
            turn.reply += piece
            yield piece

    def finish(self, turn: Turn) -> dict:
        """What a caller needs to know about a finished reply: its answer part, whether it hands off, its sources,
        and how much of it is quoted from them (quote_support: the share of its ##begin_quote## spans found word
        for word in the sources, None without a quote). An answer with sources of which nothing is quoted is
        flagged `unquoted`: a person should check it against them."""
        answer = metrics.answer_text(turn.reply)
        handoff = is_refusal(answer, self.refusal_answer)
        support = metrics.quote_support(turn.reply, [s["text"] for s in turn.sources]) if turn.sources else None
        return {"question": turn.question, "answer": answer, "reply": turn.reply,
                "answer_marked": final_answer(turn.reply) is not None, "handoff": handoff, "sources": turn.sources,
                "quote_support": support, "unquoted": bool(turn.sources) and not handoff and not support}


def append_jsonl(path: str, record: dict):
    """One JSON line, appended in a single write (a log another process may be reading)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
