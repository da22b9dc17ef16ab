"""Generate a RAFT dataset from your documents with a teacher model behind an OpenAI-compatible server.

  python raft.py -u http://localhost:8001/v1 -k EMPTY -t 4            # vLLM / llama.cpp / TGI
  API_KEY=... python raft.py -u https://api.example.com/v1 -m MODEL   # a cloud API
  python raft.py -u http://gpu1:8001/v1 -u http://gpu2:8001/v1        # several replicas

documents -> chunks -> questions per chunk -> chain-of-thought answers -> RAFT records in -o (default ./output/):
the Hugging Face dataset (save_to_disk), raft.jsonl (or the format chosen) and raft_run.json (the settings).
Every teacher reply is cached: run the same command again after a crash or Ctrl-C and it resumes.
Settings live in raft.yaml (-c); the flags below override them.
"""
import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import datasets

import format as formats
from config import RAFT_SCHEMA, TOOLKIT_VERSION, ConfigError, fill_prompt, load_config_with_flags
from llm_client import ChatClient, ChatResult, LLMFatalError, public_host
from raft_utils import (QA, AssemblySettings, InputError, assemble, chunks_needed, final_answer, load_chunks,
                        normalise, parse_questions, quotes_verified)

DEFAULT_URL = "http://localhost:8001/v1"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="raft.yaml", help="settings file (default raft.yaml)")
    p.add_argument("-u", "--url", action="append", help=f"teacher API base URL; repeat for replicas (default {DEFAULT_URL})")
    p.add_argument("-k", "--api_key", default="EMPTY", help="API key; the API_KEY environment variable wins over it")
    p.add_argument("-m", "--model", help="teacher model name (default: the only model the server lists)")
    p.add_argument("-t", "--questions_per_chunk", type=int, help="questions per chunk")
    p.add_argument("-o", "--output", help="output folder")
    p.add_argument("--chunk_size", type=int, help="characters per chunk")
    p.add_argument("--data_dir", help="documents folder")
    p.add_argument("--xml_path", help="local sitemap XML whose pages are fetched")
    p.add_argument("--insecure", action="store_const", const=False, dest="verify_ssl",
                   help="do not verify TLS certificates of sitemap pages")
    p.add_argument("--seed", type=int)
    p.add_argument("--max_in_flight", type=int, help="requests in flight at once (default 32)")
    p.add_argument("--rpm", type=int, help="requests per minute limit")
    p.add_argument("--tpm", type=int, help="tokens per minute limit")
    p.add_argument("--timeout", type=float, dest="request_timeout", help="seconds per request")
    p.add_argument("--max_retries", type=int)
    p.add_argument("--output_format", choices=formats.FORMATS)
    p.add_argument("--output_type", choices=formats.TYPES)
    p.add_argument("--cache_path", help="cache file (default <output>/llm_cache.jsonl)")
    p.add_argument("--max_chunks", type=int,
                   help="ask about the first N chunks only (a quick trial); distractors come from all chunks")
    return p.parse_args(argv)


TRUNCATED = "truncated: cut at max_tokens, also with twice the budget"


def complete_whole(client, requests, desc, stats) -> list[ChatResult]:
    """Replies that were not cut at max_tokens. A cut one (finish_reason "length") is asked once more with twice
    the budget, then dropped: a cut chain of thought may lack its <ANSWER>: line or end mid-sentence."""
    results = client.complete_all(requests, desc)
    cut = [k for k, result in enumerate(results) if result.text is not None and result.truncated]
    if cut:
        again = [(requests[k][0], {**requests[k][1], "max_tokens": 2 * requests[k][1]["max_tokens"]}) for k in cut]
        for k, result in zip(cut, client.complete_all(again, f"{desc} cut at max_tokens, again with twice the budget")):
            results[k] = ChatResult(None, error=TRUNCATED) if result.truncated else result
        stats["replies cut at max_tokens"] = stats.get("replies cut at max_tokens", 0) + len(cut)
    return results


def drop_reason(stage: str, result: ChatResult) -> str:
    return TRUNCATED if result.error == TRUNCATED else f"{stage} request failed ({result.error})"


def ask_questions(client, cfg, chunks, stats) -> list[tuple[int, str]]:
    """(chunk index, question) pairs: at most questions_per_chunk per chunk, no question twice in the run."""
    params = {"temperature": cfg["temperature"], "max_tokens": cfg["question_max_tokens"]}
    requests = [(fill_prompt(cfg["question_prompt"], context=c.text, num_questions=cfg["questions_per_chunk"]), params)
                for c in chunks]
    # A small teacher sometimes repeats the worked example's questions: those are not about the chunk.
    example = normalise(" ".join(m["content"] for m in cfg["question_prompt"]))
    pairs, seen = [], set()
    for index, result in enumerate(complete_whole(client, requests, "questions", stats)):
        if result.text is None:
            stats["dropped"][drop_reason("question", result)] += 1
            continue
        kept = 0
        for question in parse_questions(result.text):
            if kept == cfg["questions_per_chunk"]:
                break
            key = normalise(question)
            if key in example:
                stats["dropped"]["question copied from the prompt's example"] += 1
                continue
            if key in seen:
                stats["dropped"]["duplicate question"] += 1
                continue
            seen.add(key)
            pairs.append((index, question))
            kept += 1
        if not kept:
            stats["dropped"]["chunk without a usable question"] += 1
    stats["questions"] = len(pairs)
    return pairs


def answer_questions(client, cfg, chunks, pairs, stats) -> list[QA]:
    """A chain-of-thought answer per question; one retry for an answer without '<ANSWER>:'."""
    params = {"temperature": cfg["temperature"], "max_tokens": cfg["answer_max_tokens"]}
    requests = [(fill_prompt(cfg["answer_prompt"], context=chunks[i].text, question=q), params) for i, q in pairs]
    results = complete_whole(client, requests, "answers", stats)
    unfinished = [k for k, r in enumerate(results) if r.text is not None and final_answer(r.text) is None]
    if unfinished:
        retries = [(requests[k][0] + [{"role": "assistant", "content": results[k].text},
                                      {"role": "user", "content": cfg["answer_retry_prompt"]}], params)
                   for k in unfinished]
        for k, result in zip(unfinished, complete_whole(client, retries, "answer retries", stats)):
            results[k] = result
        stats["answers retried"] = len(unfinished)
    qas = []
    for (index, question), result in zip(pairs, results):
        if result.text is None:
            stats["dropped"][drop_reason("answer", result)] += 1
        elif final_answer(result.text) is None:
            stats["dropped"]["answer without <ANSWER>: after a retry"] += 1
        else:
            verified = quotes_verified(result.text, chunks[index].text)
            if not verified and cfg["quote_check"] == "drop":
                stats["dropped"]["quotes not found in the oracle chunk"] += 1
                continue
            qas.append(QA(index, question, result.text, verified))
    stats["answers"] = len(qas)
    stats["unverified quotes"] = sum(not qa.quotes_verified for qa in qas)
    return qas


def write_outputs(records, cfg, client, stats) -> Path:
    output = Path(cfg["output"])
    output.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records).save_to_disk(str(output))
    target = formats.write(records, str(output / "raft"), cfg["output_format"], cfg["output_type"],
                           cfg["output_chat_system_prompt"])
    run_settings = {
        "tool": "raft-toolkit", "version": TOOLKIT_VERSION, "teacher_model": client.model,
        "endpoints": [public_host(u) for u in client.urls], "seed": cfg["seed"], "config": cfg,
        "counts": {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in stats.items()},
    }
    (output / "raft_run.json").write_text(json.dumps(run_settings, indent=2, ensure_ascii=False) + "\n")
    return target


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
        f"examples         {stats['examples']}: {stats['oracle-free']} without the oracle, {stats['refusal']} refusals",
        f"unverified quotes {stats.get('unverified quotes', 0)} (flagged with quotes_verified=false)",
        f"requests         {usage.sent} sent, {usage.cached} from the cache, {usage.retries} retries, {usage.failed} failed, "
        f"{usage.truncated} cut at max_tokens",
        f"tokens           {usage.prompt_tokens} prompt + {usage.completion_tokens} completion sent in this run",
        f"time             {seconds:.1f} s",
        f"output           {target}",
    ]
    print("\n".join(lines))


def run(args) -> int:
    started = time.time()
    cfg = load_config_with_flags(args.config, RAFT_SCHEMA, args)
    stats = {"dropped": collections.Counter()}

    loaded, chunks, stats["chunks dropped"] = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"],
                                                          cfg["chunk_size"])
    # --max_chunks limits the chunks asked about; distractors still come from every chunk.
    asked = chunks[:args.max_chunks] if args.max_chunks else chunks
    stats.update(documents=len(loaded.documents), chunks=len(chunks), **{"chunks asked": len(asked)})
    assembly = AssemblySettings(cfg["num_distract_docs"], cfg["oracle_probability"],
                                cfg["refusal_probability"], cfg["refusal_answer"])
    if len(chunks) < chunks_needed(assembly):
        raise InputError(f"only {len(chunks)} chunk(s), but each example needs {chunks_needed(assembly)} distinct "
                         "chunks (oracle + num_distract_docs + 1 spare): add documents, lower --chunk_size "
                         "or lower num_distract_docs")

    client = ChatClient(urls=args.url or [DEFAULT_URL], api_key=os.environ.get("API_KEY") or args.api_key,
                        model=cfg["model"], max_in_flight=cfg["max_in_flight"], timeout=cfg["request_timeout"],
                        max_retries=cfg["max_retries"], rpm=cfg["rpm"], tpm=cfg["tpm"],
                        cache_path=cfg["cache_path"] or str(Path(cfg["output"]) / "llm_cache.jsonl"))
    try:
        client.preflight()
        print(f"teacher {client.model} at {', '.join(public_host(u) for u in client.urls)}; "
              f"questions on {len(asked)} of {len(chunks)} chunks from {len(loaded.documents)} documents", flush=True)
        pairs = ask_questions(client, cfg, asked, stats)
        qas = answer_questions(client, cfg, chunks, pairs, stats)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished replies are kept in {client.cache.path}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        client.close()

    records = assemble(qas, chunks, assembly, cfg["seed"])
    if not records:
        dropped = ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "nothing parsed"
        raise InputError(f"the teacher produced no usable question/answer pair ({dropped}): "
                         f"check the model and the prompts in {args.config}")
    stats.update(examples=len(records),
                 **{"oracle-free": sum(not r["oracle_present"] and r["id"].startswith("seed") for r in records),
                    "refusal": sum(r["id"].startswith("refusal") for r in records)})
    target = write_outputs(records, cfg, client, stats)
    print_summary(stats, client, target, loaded.skipped, time.time() - started)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, InputError, LLMFatalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
