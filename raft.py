"""Generate a RAFT dataset from your documents with a teacher model behind an OpenAI-compatible server.

  python raft.py -u http://localhost:8001/v1 -k EMPTY -t 4            # vLLM / llama.cpp / TGI
  API_KEY=... python raft.py -u https://api.example.com/v1 -m MODEL   # a cloud API
  python raft.py -u http://gpu1:8001/v1 -u http://gpu2:8001/v1        # several replicas

documents -> chunks -> questions per chunk -> chain-of-thought answers -> RAFT records in -o (default ./output/):
the Hugging Face dataset (save_to_disk), raft.jsonl (or the format chosen) and raft_run.json (the settings).
Every teacher reply is cached, keyed by the teacher's fingerprint: run the same command again after a crash or Ctrl-C
and it resumes. The new outputs replace the previous ones in -o only once all are written; a run that fails or is
stopped leaves them as they were, and a second run into a folder that a running one holds stops at once.
Settings live in raft.yaml (-c); the flags below override them.
"""
import argparse
import asyncio
import collections
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

import format as formats
from cli import add_client_flags, add_source_flags, client_from_config, connect, run_main
from config import RAFT_SCHEMA, RUN_RECORD, TOOLKIT_VERSION, fill_prompt, load_config_with_flags
from documents import load_chunks
from errors import InputError, OutputError
from folder_lock import STAGING, FolderLock, swap_in
from llm_client import ChatResult, public_host
from raft_utils import QA, AssemblySettings, chunks_needed, parse_questions, quotes_verified
from quality import DATA_CARD, QualityStage, data_card
from record_writer import STREAM, RecordWriter, convert_stream, what_to_do_about
from text import final_answer, normalise

DEFAULT_URL = "http://localhost:8001/v1"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="raft.yaml", help="settings file (default raft.yaml)")
    p.add_argument("-u", "--url", action="append", help=f"teacher API base URL; repeat for replicas (default {DEFAULT_URL})")
    p.add_argument("-m", "--model", help="teacher model name (default: the only model the server lists)")
    p.add_argument("-t", "--questions_per_chunk", type=int, help="questions per chunk")
    p.add_argument("-o", "--output", help="output folder")
    add_source_flags(p, reads_run_record=False)
    p.add_argument("--seed", type=int)
    add_client_flags(p)
    p.add_argument("--output_format", choices=formats.FORMATS)
    p.add_argument("--output_type", choices=formats.TYPES)
    p.add_argument("--cache_path", help="reply cache (default <output>/llm_cache.sqlite; an older llm_cache.jsonl "
                                        "is imported)")
    p.add_argument("--max_chunks", type=int,
                   help="ask about the first N chunks only (a quick trial); distractors come from all chunks")
    p.add_argument("--window_chunks", type=int, help="chunks finished and written at a time (default 2000)")
    return p.parse_args(argv)


TRUNCATED = "truncated: cut at max_tokens, also with twice the budget"
QUESTION_PRIORITY, ANSWER_PRIORITY = 1, 0      # answers first: a chunk in progress finishes before new ones start


class Pipeline:
    """The teacher's work on windows of chunks, pipelined: a chunk's answers are asked as soon as its questions
    come back, and have priority over further chunks' questions, so the server is never left waiting for a stage
    to finish. Chunks claim their questions in chunk order (no question twice in the run, the first chunk to ask
    it keeps it), so the output does not depend on which replies come back first, nor on the window size."""

    def __init__(self, client, cfg, chunks, stats):
        self.client, self.cfg, self.chunks, self.stats = client, cfg, chunks, stats
        self.question_params = {"temperature": cfg["temperature"], "max_tokens": cfg["question_max_tokens"]}
        self.answer_params = {"temperature": cfg["temperature"], "max_tokens": cfg["answer_max_tokens"]}
        # A small teacher sometimes repeats the worked example's questions: those are not about the chunk.
        self.example = normalise(" ".join(m["content"] for m in cfg["question_prompt"]))
        self.seen: set[bytes] = set()      # digests of the questions kept so far: 16 bytes each, not the text

    async def window(self, indices: range, progress) -> list[QA]:
        """QAs of the chunks `indices`, in chunk order, then question order."""
        claimed_before = asyncio.get_running_loop().create_future()
        claimed_before.set_result(None)
        tasks = []
        for index in indices:
            claimed = asyncio.get_running_loop().create_future()
            tasks.append(asyncio.ensure_future(self.chunk(index, claimed_before, claimed, progress)))
            claimed_before = claimed
        return [qa for qas in await asyncio.gather(*tasks) for qa in qas]

    async def chunk(self, index: int, claimed_before, claimed, progress) -> list[QA]:
        try:
            messages = fill_prompt(self.cfg["question_prompt"], context=self.chunks[index].text,
                                   num_questions=self.cfg["questions_per_chunk"])
            result = await self.whole(messages, self.question_params, QUESTION_PRIORITY)
            await claimed_before           # every earlier chunk has claimed its questions
            kept = self.claim(result)
        finally:
            if not claimed.done():
                claimed.set_result(None)
        if result.cached:
            # A re-run: the answers were most likely cached too, and awaited in turn they cost no task each (a
            # second of the 25K-chunk re-run). A missing one is asked on its own, beside the other chunks.
            qas = [await self.answer(index, question) for question in kept]
        else:
            qas = await asyncio.gather(*(self.answer(index, question) for question in kept))
        progress.update(1)
        return [qa for qa in qas if qa is not None]

    def claim(self, result) -> list[str]:
        """At most questions_per_chunk questions of a reply that no earlier chunk asked."""
        if result.text is None:
            self.stats["dropped"][drop_reason("question", result)] += 1
            return []
        kept = []
        for question in parse_questions(result.text):
            if len(kept) == self.cfg["questions_per_chunk"]:
                break
            key = normalise(question)
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
            if key in self.example:
                self.stats["dropped"]["question copied from the prompt's example"] += 1
            elif digest in self.seen:
                self.stats["dropped"]["duplicate question"] += 1
            else:
                self.seen.add(digest)
                kept.append(question)
        if not kept:
            self.stats["dropped"]["chunk without a usable question"] += 1
        self.stats["questions"] += len(kept)
        return kept

    async def answer(self, index: int, question: str) -> Optional[QA]:
        """A chain-of-thought answer; asked once more when it lacks '<ANSWER>:'."""
        messages = fill_prompt(self.cfg["answer_prompt"], context=self.chunks[index].text, question=question)
        result = await self.whole(messages, self.answer_params, ANSWER_PRIORITY)
        if result.text is not None and final_answer(result.text) is None:
            self.stats["answers retried"] += 1
            messages = messages + [{"role": "assistant", "content": result.text},
                                   {"role": "user", "content": self.cfg["answer_retry_prompt"]}]
            result = await self.whole(messages, self.answer_params, ANSWER_PRIORITY)
        if result.text is None:
            self.stats["dropped"][drop_reason("answer", result)] += 1
            return None
        if final_answer(result.text) is None:
            self.stats["dropped"]["answer without <ANSWER>: after a retry"] += 1
            return None
        verified = quotes_verified(result.text, self.chunks[index].text)
        self.stats["answers"] += 1
        self.stats["unverified quotes"] += not verified
        return QA(index, question, result.text, verified)

    async def whole(self, messages, params, priority) -> ChatResult:
        """A reply that was not cut at max_tokens. A cut one (finish_reason "length") is asked once more with twice
        the budget, then dropped: a cut chain of thought may lack its <ANSWER>: line or end mid-sentence."""
        result = await self.client.complete(messages, params, priority)
        if result.text is None or not result.truncated:
            return result
        self.stats["replies cut at max_tokens"] += 1
        again = await self.client.complete(messages, {**params, "max_tokens": 2 * params["max_tokens"]}, priority)
        return ChatResult(None, error=TRUNCATED) if again.truncated else again


def drop_reason(stage: str, result: ChatResult) -> str:
    return TRUNCATED if result.error == TRUNCATED else f"{stage} request failed ({result.error})"


def write_outputs(staging: Path, cfg, client, stats, quality: QualityStage, chunks_asked: int) -> str:
    """The converted file, raft_run.json (the settings and counts) and data_card.md, in the staging folder; returns
    the converted file's name."""
    target = convert_stream(staging, cfg)
    counts = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in stats.items()}
    run_settings = {
        "tool": "raft-toolkit", "version": TOOLKIT_VERSION, "teacher_model": client.model,
        "teacher_fingerprint": client.fingerprint, "endpoints": [public_host(u) for u in client.urls],
        "seed": cfg["seed"], "config": cfg, "counts": counts,
    }
    (staging / RUN_RECORD).write_text(json.dumps(run_settings, indent=2, ensure_ascii=False) + "\n")
    stages = [("chunks (asked about)", f"{stats['chunks']} ({chunks_asked})"),
              ("questions the teacher wrote", stats.get("questions", 0)),
              ("answers", stats.get("answers", 0)),
              ("dropped before the quality stage", sum(stats["dropped"].values())),
              ("questions kept by the quality stage", quality.card.verdicts["kept"]),
              ("records written", stats["examples"]), ("records filtered out", stats["filtered records"])]
    settings = {"teacher_model": client.model, "seed": cfg["seed"], "chunk_size": cfg["chunk_size"],
                "questions_per_chunk": cfg["questions_per_chunk"], "num_distract_docs": cfg["num_distract_docs"],
                "oracle_probability": cfg["oracle_probability"], "refusal_probability": cfg["refusal_probability"],
                "quality": {k: v for k, v in cfg["quality"].items() if not k.endswith("_prompt")}}
    (staging / DATA_CARD).write_text(data_card(quality.card, stages, settings, chunks_asked), encoding="utf-8")
    return target.name


def print_summary(stats, client, target, skipped, seconds):
    usage = client.usage
    lines = [
        f"documents        {stats['documents']} loaded, {len(skipped)} skipped",
        *(f"  skipped        {source}: {why}" for source, why in skipped),
        f"chunks           {stats['chunks']} ({stats['chunks asked']} asked about; {', '.join(f'{n} {why}' for why, n in stats['chunks dropped'].items())} dropped)",
        f"questions        {stats.get('questions', 0)}",
        f"answers          {stats.get('answers', 0)} ({stats.get('answers retried', 0)} retried for a missing <ANSWER>:; "
        f"{stats.get('replies cut at max_tokens', 0)} replies cut at max_tokens asked again with twice the budget)",
        *(f"  dropped        {n} {why}" for why, n in sorted(stats["dropped"].items())),
        f"quality filters  {sum(stats['filtered'].values())} questions dropped ({stats.get('filtered records', 0)} "
        "records, in filtered_out.jsonl)",
        *(f"  filtered       {n} {why}" for why, n in sorted(stats["filtered"].items())),
        f"examples         {stats['examples']}: {stats['oracle-free']} without the oracle, {stats['refusal']} refusals",
        f"unverified quotes {stats.get('unverified quotes', 0)} (flagged with quotes_verified=false)",
        f"requests         {usage.sent} sent, {usage.cached} from the cache, {usage.retries} retries, {usage.failed} failed, "
        f"{usage.truncated} cut at max_tokens",
        *(f"replica          {line} (its requests went to the others)" for line in client.replicas.outages()),
        f"tokens           {usage.prompt_tokens} prompt + {usage.completion_tokens} completion sent in this run",
        f"time             {seconds:.1f} s",
        f"output           {target} (data card: {target.parent / DATA_CARD})",
    ]
    print("\n".join(lines))


def generate(client, cfg, chunks, asked, writer: RecordWriter, stats) -> QualityStage:
    """Window after window: the teacher's questions and answers for the window's chunks, judged by the quality
    stage, handed to the record writer, which appends their records to raft.jsonl's stream and to the Hugging Face
    dataset (the dropped ones to filtered_out.jsonl). Memory is bounded by the window (window_chunks), not by the
    corpus; any window size gives the same records."""
    pipeline = Pipeline(client, cfg, chunks, stats)
    quality = QualityStage(cfg["quality"], chunks, client, {"temperature": cfg["temperature"],
                                                            "max_tokens": cfg["quality"]["teacher_grade_max_tokens"]})
    with tqdm(total=len(asked), desc="chunks", unit="chunk", dynamic_ncols=True) as progress:
        size = cfg["window_chunks"]
        for start in range(0, len(asked), size):
            qas = client.run(pipeline.window(range(start, min(start + size, len(asked))), progress))
            writer.add(quality.judge(qas))
    stats.update(writer.finish())
    stats["filtered"] = collections.Counter({k: v for k, v in quality.card.verdicts.items() if k != "kept"})
    return quality


def load_and_check(cfg, args, stats) -> tuple:
    """The documents and chunks (every chunk a possible distractor; --max_chunks limits those asked about) and the
    assembly settings, checked before any request."""
    loaded, chunks, stats["chunks dropped"] = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"],
                                                          cfg["chunk_size"])
    asked = chunks[:args.max_chunks] if args.max_chunks else chunks
    stats.update(documents=len(loaded.documents), chunks=len(chunks), **{"chunks asked": len(asked)})
    assembly = AssemblySettings(cfg["num_distract_docs"], cfg["oracle_probability"],
                                cfg["refusal_probability"], cfg["refusal_answer"])
    if len(chunks) < chunks_needed(assembly):
        raise InputError(f"only {len(chunks)} chunk(s), but each example needs {chunks_needed(assembly)} distinct "
                         "chunks (oracle + num_distract_docs + 1 spare): add documents, lower --chunk_size "
                         "or lower num_distract_docs")
    return loaded, chunks, asked, assembly


def writable_folder(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the output folder {path} ({e.strerror}): {what_to_do_about(e)}") from None
    return path


def run(args) -> int:
    started = time.time()
    cfg = load_config_with_flags(args.config, RAFT_SCHEMA, args)
    stats = collections.Counter()
    stats["dropped"] = collections.Counter()
    loaded, chunks, asked, assembly = load_and_check(cfg, args, stats)
    output = writable_folder(Path(cfg["output"]))
    with FolderLock(output):
        staging = output / STAGING
        shutil.rmtree(staging, ignore_errors=True)         # an earlier run's unfinished outputs
        writable_folder(staging)
        done = ask_teacher(cfg, args, chunks, asked, assembly, staging, stats, loaded)
        if done is None:
            return 130
        client, quality = done
        try:
            if not stats["examples"]:
                dropped = ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "nothing parsed"
                raise InputError(f"the teacher produced no usable question/answer pair ({dropped}): "
                                 f"check the model and the prompts in {args.config}")
            target = write_outputs(staging, cfg, client, stats, quality, len(asked))
            swap_in(staging, output)
        except OSError as e:
            raise OutputError(f"writing the outputs into {output} failed ({e}): {what_to_do_about(e)}; the "
                              "previous outputs there are unchanged") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print_summary(stats, client, output / target, loaded.skipped, time.time() - started)
    return 0


def ask_teacher(cfg, args, chunks, asked, assembly, staging: Path, stats, loaded):
    """The teacher's questions and answers, judged by the quality stage and assembled into records in the staging
    folder by the record writer. Returns the (closed) client and the quality stage, or None after Ctrl-C; any
    failure removes the staging folder, so the previous outputs in -o stay as they were."""
    cache_path = cfg["cache_path"] or str(staging.parent / "llm_cache.sqlite")
    # The record writer first, while this process has no event loop, socket, thread or open database for it to
    # inherit.
    writer = client = None
    try:
        writer = RecordWriter(chunks, assembly, cfg["seed"], staging / STREAM, staging)
        client = client_from_config(cfg, args, args.url or [DEFAULT_URL], cfg["model"], cache_path)
        connect(client, args)
        client.identify_model()
        print(f"teacher {client.model} at {', '.join(public_host(u) for u in client.urls)}; "
              f"questions on {len(asked)} of {len(chunks)} chunks from {len(loaded.documents)} documents", flush=True)
        return client, generate(client, cfg, chunks, asked, writer, stats)
    except BaseException as stopped:
        if writer:
            writer.abandon()
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(stopped, KeyboardInterrupt):
            raise
        print(f"\ninterrupted: finished replies are kept in {client.cache.path if client else cache_path} and the "
              "previous outputs are unchanged; run the same command again to resume", file=sys.stderr)
        return None
    finally:
        if client:
            client.close()


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
