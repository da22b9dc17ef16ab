"""Evaluate a fine-tuned model against baselines, with and without retrieval, and write a report with plots.

  python raft_eval.py -m raft-8b -u http://localhost:8000/v1 -j http://localhost:8001/v1 -r 5
  python raft_eval.py -m raft-8b -u http://gpu1:8000/v1 -r 3 5 7 \\
      --baseline meta-llama/Meta-Llama-3-8B-Instruct=http://gpu2:8000/v1 \\
      --baseline meta-llama/Meta-Llama-3-70B-Instruct=http://gpu3:8001/v1 -j http://gpu3:8001/v1
  python raft_eval.py --draft_from output/raft.jsonl --draft_size 50     # a draft eval file to curate

Every system (the model under test and each --baseline NAME=URL, NAME being the served model name) answers each
question of the eval file from its own knowledge and with the top-k chunks the retriever finds in the documents
(the same loaders and chunking as raft.py), for each k of -r. The judge model grades every answer against the gold
answer (YES/NO). Written to -o: metrics.json, questions.jsonl (every answer, verdict and retrieved source),
report.md and the plots. Every reply is cached there: run the same command again after a crash or Ctrl-C and it
resumes. Settings live in raft_eval_config.yaml (-c); the flags below override them.

How far the numbers can be trusted is part of the report: the judge also grades control answers whose verdict
is known (each question's gold answer, another question's, the refusal), which gives its true-positive and
true-negative rates; every metric has a 95% bootstrap interval over the questions; the model under test is
compared with each baseline on the same questions (paired bootstrap and exact McNemar). A system's cached replies
are reused only while its server describes the same model (its /models entry, --model_revision), and
--train_data reports eval questions that also appear in the training data.
"""
import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import calibration
import format as formats
import metrics
import report
from cli import add_client_flags, add_source_flags, client_from_config, connect, run_main
from config import TOOLKIT_VERSION, fill_prompt, load_eval_config
from documents import load_chunks
from errors import ConfigError, InputError, LLMFatalError, OutputError
from folder_lock import FolderLock
from llm_client import ChatClient, public_host
from raft_utils import instruction
from refusal import is_refusal
from text import final_answer
from rerank import with_reranker
from retrieval import KINDS, build_retrievers, load_embedder, settings_from_config

DEFAULT_URL = "http://localhost:8000/v1"
DEFAULT_JUDGE_URL = "http://localhost:8001/v1"
SUPPORT_KS = (1, 3, 5, 7)      # answer-support recall is reported at these k (and at every k of -r)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="raft_eval_config.yaml", help="settings file (default raft_eval_config.yaml)")
    p.add_argument("-m", "--model", help="served name of the model under test (default: the only model at -u)")
    p.add_argument("-u", "--url", default=DEFAULT_URL, help=f"its API base URL (default {DEFAULT_URL})")
    p.add_argument("-j", "--judge_url", default=DEFAULT_JUDGE_URL, help=f"judge API base URL (default {DEFAULT_JUDGE_URL})")
    p.add_argument("--judge_model", help="judge model name (default: the only model at -j)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=URL",
                   help="a baseline system: served model name and its API base URL; repeatable")
    p.add_argument("-r", "--rag_topk", type=int, nargs="+", help="chunks retrieved per question; several = a sweep")
    add_source_flags(p, reads_run_record=True)
    p.add_argument("-o", "--output", help="output folder")
    p.add_argument("--eval_file", help="JSON list of {question, answer}")
    p.add_argument("--retriever", help=f"one of {', '.join(KINDS)}")
    p.add_argument("--reranker", help="none, llm, or a CrossEncoder name or folder (rerank.py)")
    p.add_argument("--rerank_url", help="the model server of reranker llm (default: the judge's, -j)")
    p.add_argument("--limit", type=int, help="evaluate the first N questions only (a quick trial)")
    p.add_argument("--max_tokens", type=int, dest="answer_max_tokens", help="longest answer, in tokens")
    add_client_flags(p)
    p.add_argument("--draft_from", help="write a draft eval file from this RAFT dataset (JSONL or save_to_disk "
                                        "folder) and stop")
    p.add_argument("--draft_size", type=int, default=50, help="questions in the draft (default 50)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the draft's sample, the judge's control answers and the bootstrap (default 42)")
    p.add_argument("--model_revision", default="",
                   help="a label of the weights under test (a commit, a run id): a new one never reuses old answers")
    p.add_argument("--train_data", action="append", default=[], metavar="FILE",
                   help="a RAFT JSONL the model was trained on: eval questions found in it are counted and "
                        "reported (repeatable)")
    return p.parse_args(argv)


# ---- the eval file ------------------------------------------------------------------------------------
def read_eval_file(path: str) -> list[dict]:
    """The eval file's {question, answer} items; an InputError naming the file and the item otherwise."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"eval file {path} not found: pass --eval_file, or write a draft with --draft_from") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"eval file {path} is not valid JSON ({e}): it must be a list of "
                         '{"question": ..., "answer": ...}') from None
    if not isinstance(items, list) or not items:
        raise InputError(f"eval file {path} must be a non-empty JSON list of {{\"question\": ..., \"answer\": ...}}")
    for number, item in enumerate(items, 1):
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip()
                                               for k in ("question", "answer"))):
            raise InputError(f"eval file {path}, item {number}: needs non-empty 'question' and 'answer' strings")
    return [{"question": item["question"], "answer": item["answer"]} for item in items]


def eval_draft(records: list[dict], size: int, seed: int) -> list[dict]:
    """A seeded sample of the dataset's questions with the text after <ANSWER>: as the answer; refusal examples
    and repeated questions left out."""
    candidates, seen = [], set()
    for record in records:
        answer = final_answer(record["cot_answer"])
        if str(record.get("id", "")).startswith("refusal_task") or not answer or record.get("question") in seen:
            continue
        seen.add(record.get("question"))
        candidates.append({"question": record.get("question", ""), "answer": answer})
    return random.Random(seed).sample(candidates, min(size, len(candidates)))


def write_draft(args, output: Path) -> int:
    source = args.draft_from
    try:
        records = formats.read(source, "arrow" if Path(source).is_dir() else "jsonl")
    except ValueError as e:
        raise InputError(str(e)) from None
    draft = eval_draft(records, args.draft_size, args.seed)
    if not draft:
        raise InputError(f"{source} has no example with a question and an <ANSWER>: to draft from")
    output.mkdir(parents=True, exist_ok=True)
    target = output / "eval_draft.json"
    target.write_text(json.dumps(draft, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    kept, by_question, by_chunk = without_drafted(records, draft)
    training = formats.write(kept, str(output / "raft_without_draft"), "hf", "jsonl", "")
    print(f"wrote {len(draft)} questions (of {len(records)} records) to {target}: check every answer against the "
          "documents, fix or drop the wrong ones, then pass it with --eval_file")
    print(f"wrote the training data without them to {training}: {len(kept)} of {len(records)} records, "
          f"{by_question} left out for a drafted question and {by_chunk} more whose oracle chunk answers one. "
          "Fine-tune on this file, or the evaluation measures what the model memorised")
    return 0


def without_drafted(records: list[dict], draft: list[dict]) -> tuple[list[dict], int, int]:
    """The records that neither ask a drafted question nor have the oracle chunk of one (another question about
    that chunk would teach its answer): (kept records, left out by question, left out by chunk)."""
    drafted = {metrics.squad_normalise(item["question"]) for item in draft}
    asks = [metrics.squad_normalise(r.get("question", "")) in drafted for r in records]
    oracles = {r.get("oracle_context") for r, hit in zip(records, asks) if hit and r.get("oracle_context")}
    kept, by_question, by_chunk = [], 0, 0
    for record, hit in zip(records, asks):
        if hit:
            by_question += 1
        elif record.get("oracle_context") in oracles:
            by_chunk += 1
        else:
            kept.append(record)
    return kept, by_question, by_chunk


def training_overlap(questions: list[dict], paths: list[str]) -> dict:
    """How many eval questions the training data asks too (SQuAD-normalised match), for --train_data."""
    asked = set()
    for path in paths:
        try:
            asked |= {metrics.squad_normalise(r.get("question", "")) for r in formats.read(path, "jsonl")}
        except ValueError as e:
            raise InputError(f"--train_data {e}") from None
    found = [q["question"] for q in questions if metrics.squad_normalise(q["question"]) in asked]
    return {"files": paths, "eval_questions": len(questions), "found_in_training": len(found), "examples": found[:10]}


# ---- answering and judging ------------------------------------------------------------------------------
def parse_baseline(spec: str) -> tuple[str, str]:
    name, sep, url = spec.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ConfigError(f"--baseline {spec!r}: write it as NAME=URL, e.g. "
                          "meta-llama/Meta-Llama-3-8B-Instruct=http://localhost:8002/v1")
    return name, url


def cache_file(output: Path, name: str) -> Path:
    """One reply cache per system, so two servers that serve the same model name never share answers (a .jsonl
    cache of an earlier version beside it is imported)."""
    return output / "cache" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".sqlite")


def given_chunks(chunks, rankings, topks) -> dict[str, list[list[str]]]:
    """Per condition ('no_rag', 'rag_top5', ...), the chunk texts each question's answer is given."""
    return {"no_rag": [[] for _ in rankings],
            **{f"rag_top{k}": [[chunks[i].text for i in ranking[:k]] for ranking in rankings] for k in topks}}


def answer_requests(cfg, questions, given: dict[str, list[list[str]]]) -> dict[str, list]:
    """Per condition, one (messages, params) request per question."""
    params = {"temperature": cfg["temperature"], "max_tokens": cfg["answer_max_tokens"]}
    return {condition: [(fill_prompt(cfg["rag_prompt"], instruction=instruction(docs, q["question"])) if docs else
                         fill_prompt(cfg["model_prompt"], question=q["question"]), params)
                        for q, docs in zip(questions, documents)]
            for condition, documents in given.items()}


def answer_all(client: ChatClient, name: str, requests: dict[str, list]) -> dict[str, list]:
    """Every condition's replies, in one pass through the client (one progress bar, full concurrency)."""
    flat = [request for condition in requests.values() for request in condition]
    results = iter(client.complete_all(flat, f"answers {name}"))
    return {condition: [next(results) for _ in batch] for condition, batch in requests.items()}


def score(question: dict, result, refusal_answer: str, given: list[str]) -> dict:
    """One answer's entry in questions.jsonl, before the judge's verdict, groundedness and similarity are added."""
    reply = result.text or ""
    answer = metrics.answer_text(reply)
    return {"reply": reply, "answer": answer, "failed": result.text is None, "error": result.error,
            "truncated": result.truncated,
            **metrics.rouge(answer, question["answer"]),
            "exact_match": metrics.exact_match(answer, question["answer"]),
            "token_f1": metrics.token_f1(answer, question["answer"]),
            "quote_support": metrics.quote_support(reply, given),
            "refusal": is_refusal(answer, refusal_answer)}


def add_similarity(entries: list[tuple[int, dict]], questions, embedder):
    """Each answer's cosine similarity to its gold answer in the retriever's embedding model (None if it failed)."""
    answered = [(q, e) for q, e in entries if not e["failed"]]
    texts = sorted({e["answer"] for _, e in answered} | {questions[q]["answer"] for q, _ in answered})
    vectors = dict(zip(texts, embedder.embed(texts))) if texts else {}
    for q, entry in entries:
        entry["similarity"] = None if entry["failed"] else \
            float(vectors[entry["answer"]] @ vectors[questions[q]["answer"]])


def judge_groundedness(judge: ChatClient, cfg, items: list[tuple[dict, list[str]]]):
    """Adds 'claims' and 'groundedness' to every (entry, chunks it was given): the judge splits the answer into
    claims and marks each supported by those chunks or not. A failed answer, a refusal and an answer with no claim
    get None (counted apart). One pass through the client: cached, resumable."""
    params = {"temperature": cfg["temperature"], "max_tokens": cfg["groundedness_max_tokens"]}
    asked = [(entry, docs) for entry, docs in items if not entry.get("failed") and not entry.get("refusal")]
    requests = [(fill_prompt(cfg["groundedness_prompt"], documents=instruction(docs, "").rstrip(),
                             answer=entry["answer"] or "(no answer)"), params) for entry, docs in asked]
    for (entry, _), result in zip(asked, judge.complete_all(requests, "groundedness")):
        entry["claims"] = metrics.parse_claims(result.text) if result.text is not None else None
    for entry, _ in items:
        entry.setdefault("claims", None)
        entry["groundedness"] = metrics.groundedness(entry["claims"] or [])


def judge_all(judge: ChatClient, cfg, questions, entries: list[tuple[int, dict]]):
    """Adds 'verdict' (True/False/None) and 'judge_reply' to every entry (an answer of a system, or a calibration
    control); a failed answer is not judged. One pass through the client: one progress bar, full concurrency."""
    params = {"temperature": cfg["temperature"], "max_tokens": cfg["judge_max_tokens"]}
    to_judge = [(q, e) for q, e in entries if not e.get("failed")]
    requests = [(fill_prompt(cfg["judge_prompt"], question=questions[q]["question"],
                             gold_answer=questions[q]["answer"], answer=e["answer"] or "(no answer)"), params)
                for q, e in to_judge]
    for (_, entry), result in zip(to_judge, judge.complete_all(requests, "judge")):
        entry["judge_reply"] = result.text
        entry["verdict"] = metrics.parse_verdict(result.text) if result.text is not None else None
    for _, entry in entries:
        entry.setdefault("judge_reply", None)
        entry.setdefault("verdict", None)


# ---- the run ----------------------------------------------------------------------------------------------
def load_run_chunks(cfg) -> tuple:
    """The documents and chunks the retriever searches, as the generation run made them; says where from."""
    loaded, chunks, _ = load_chunks(cfg["data_dir"], cfg["xml_path"], cfg["verify_ssl"], cfg["chunk_size"])
    print(f"documents {cfg['data_dir'] or cfg['xml_path']}: {len(loaded.documents)} documents, {len(chunks)} chunks "
          f"of {cfg['chunk_size']} characters (settings of {cfg['sources_from']})", flush=True)
    return loaded, chunks


def clamp_topks(topks: list[int], chunk_count: int) -> list[int]:
    kept = sorted({min(k, chunk_count) for k in topks})
    if max(topks) > chunk_count:
        print(f"warning: top-k {max(topks)} is more than the {chunk_count} chunks; using at most {chunk_count}",
              file=sys.stderr)
    return kept


@dataclass
class Endpoint:
    role: str            # "model under test", "baseline" or "judge"
    url: str
    client: ChatClient
    name: str = ""       # the served model name, known after the pre-flight check
    described: Optional[dict] = None    # what its server says about the model (ChatClient.identify_model)


def open_endpoints(cfg, args, baselines, output: Path) -> list[Endpoint]:
    """A checked client per system, then the judge's (last): an unreachable server or an unknown model is
    reported before any embedding or answering. Each system has its own reply cache."""
    wanted = [("model under test", args.model or "", args.url)] + [("baseline", n, u) for n, u in baselines]
    endpoints = [Endpoint(role, url, client_from_config(cfg, args, [url], model, str(cache_file(output, model or "model"))))
                 for role, model, url in wanted]
    endpoints.append(Endpoint("judge", args.judge_url,
                              client_from_config(cfg, args, [args.judge_url], args.judge_model,
                                                 str(cache_file(output, "judge")))))
    try:
        for endpoint in endpoints:
            endpoint.name = connect(endpoint.client, args)
            revision = args.model_revision if endpoint.role == "model under test" else ""
            endpoint.described = endpoint.client.identify_model(revision)
    except LLMFatalError as e:
        close_all(endpoints)
        raise LLMFatalError(f"{' '.join(filter(None, [endpoint.role, endpoint.client.model]))}: {e}") from None
    names = [e.name for e in endpoints[:-1]]
    if len(set(names)) < len(names):
        close_all(endpoints)
        raise ConfigError(f"a model is evaluated twice ({', '.join(names)}): give each system its own served name")
    return endpoints


def close_all(endpoints: list[Endpoint]):
    for endpoint in endpoints:
        endpoint.client.close()


def run(args) -> int:
    cfg = load_eval_config(args.config, args)
    output = Path(cfg["output"])
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the output folder {output} ({e.strerror}): choose another -o") from None
    with FolderLock(output):           # two evaluations into one folder would overwrite each other's outputs
        return write_draft(args, output) if args.draft_from else evaluate(cfg, args, output)


def evaluate(cfg, args, output: Path) -> int:
    started = time.time()
    baselines = [parse_baseline(spec) for spec in args.baseline]
    questions = read_eval_file(cfg["eval_file"])[:args.limit]
    overlap = training_overlap(questions, args.train_data) if args.train_data else None
    loaded, chunks = load_run_chunks(cfg)
    topks = clamp_topks(cfg["rag_topk"], len(chunks))
    endpoints = open_endpoints(cfg, args, baselines, output)
    rereader = reranker_client(cfg, args, output)
    try:
        rankings, support = retrieve(cfg, questions, chunks, topks, rereader)
        given = given_chunks(chunks, rankings, topks)
        log = answer_questions(cfg, endpoints[:-1], questions, chunks, rankings, given)
        add_similarity(answer_entries(log), questions,
                       load_embedder(cfg["embedding_model"], cfg["embedding_batch_size"], cfg["embedding_dtype"]))
        controls, additions = judge_answers(cfg, args, endpoints[-1], questions, log, given)
    except LLMFatalError as e:
        raise LLMFatalError(f"{e} (replies so far are kept in {output / 'cache'}; run again to resume)") from None
    finally:
        close_all(endpoints)
        if rereader is not None:
            rereader.close()
    *systems, judge = endpoints
    settings = {"tool": "raft-toolkit", "version": TOOLKIT_VERSION, "questions": len(questions),
                "eval_file": cfg["eval_file"], "sources": cfg["data_dir"] or cfg["xml_path"],
                "sources_from": cfg["sources_from"],
                "documents": len(loaded.documents), "chunks": len(chunks), "chunk_size": cfg["chunk_size"],
                "retriever": cfg["retriever"], "embedding_model": cfg["embedding_model"], "rag_topk": topks,
                "judge_model": judge.name, "endpoints": {s.name: public_host(s.url) for s in endpoints},
                "models": {f"{s.role}: {s.name}": {"fingerprint": s.client.fingerprint, **s.described}
                           for s in endpoints},
                "seed": args.seed, "bootstrap_resamples": cfg["bootstrap_resamples"], "config": cfg}
    results = {"settings": settings, **summarise(cfg, args, systems, log, controls, additions, list(given)),
               "training_overlap": overlap, "retrieval": support}
    paths = write_outputs(output, results, log, controls + additions)
    print_summary(results, endpoints, paths, time.time() - started)
    return 0


def reranker_client(cfg, args, output: Path) -> Optional[ChatClient]:
    """The model server of reranker llm (--rerank_url, else the judge's), checked; its replies cached in -o."""
    if cfg["reranker"] != "llm":
        return None
    client = client_from_config(cfg, args, [args.rerank_url or args.judge_url], "", str(cache_file(output, "reranker")))
    connect(client, args)
    client.identify_model()
    return client


def retrieve(cfg, questions, chunks, topks, rereader=None) -> tuple[list, dict]:
    """(each question's ranking with the configured retriever, reranked when a reranker is set; answer-support
    recall of every retriever kind, and of the reranked one). Every kind ranks the questions once, deep enough for
    the answers and the answer-support diagnostic."""
    retrievers = build_retrievers(chunks, [cfg["retriever"]] + [k for k in KINDS if k != cfg["retriever"]],
                                  cfg["embedding_model"], cfg["index_cache"] or None, cfg["embedding_batch_size"],
                                  cfg["embedding_dtype"], settings_from_config(cfg))
    if cfg["reranker"] != "none":
        retrievers = {f"{cfg['retriever']}+rerank": with_reranker(retrievers[cfg["retriever"]], chunks, cfg,
                                                                  rereader), **retrievers}
    support_ks = sorted({k for k in SUPPORT_KS + tuple(topks) if k <= len(chunks)})
    by_kind = {kind: retriever.rank([q["question"] for q in questions], max(support_ks))
               for kind, retriever in retrievers.items()}
    support = {kind: {f"recall@{k}": metrics.support_recall(ranked, chunks, [q["answer"] for q in questions], k)
                      for k in support_ks} for kind, ranked in by_kind.items()}
    return [ranking[:max(topks)] for ranking in by_kind[next(iter(retrievers))]], support


def answer_questions(cfg, systems, questions, chunks, rankings, given) -> list[dict]:
    """Every system's answers in every condition, scored without the judge: the per-question log."""
    log = [{"question": q["question"], "answer": q["answer"],
            "retrieved": [{"rank": r, "chunk": i, "source": chunks[i].source} for r, i in enumerate(ranking, 1)],
            "systems": {}} for q, ranking in zip(questions, rankings)]
    requests = answer_requests(cfg, questions, given)
    for system in systems:
        print(f"{system.role} {system.name} at {public_host(system.url)}: {len(questions)} questions x "
              f"{len(requests)} conditions", flush=True)
        replies = answer_all(system.client, system.name, requests)
        say_where_answers_came_from(system)
        for condition, results in replies.items():
            for q, (row, result) in enumerate(zip(log, results)):
                row["systems"].setdefault(system.name, {})[condition] = \
                    score(questions[q], result, cfg["refusal_answer"], given[condition][q])
    return log


def answer_entries(log: list[dict], condition: Optional[str] = None) -> list[tuple[int, dict]]:
    """(question index, entry) of every system's answer, in every condition or one."""
    return [(q, entry) for q, row in enumerate(log) for answers in row["systems"].values()
            for name, entry in answers.items() if condition in (None, name)]


def judge_answers(cfg, args, judge: "Endpoint", questions, log, given) -> tuple[list[dict], list[dict]]:
    """The judge's verdict on every answer and on the calibration controls, and the groundedness of every answer
    given documents and of the fabricated-addition controls: (controls, addition controls)."""
    golds = [q["answer"] for q in questions]
    controls = calibration.controls(golds, cfg["refusal_answer"], args.seed) if cfg["judge_calibration"] \
        else []
    additions = calibration.additions(golds, cfg["refusal_answer"], args.seed) \
        if cfg["judge_calibration"] and cfg["groundedness"] else []
    print(f"judge {judge.name} at {public_host(judge.url)}"
          + (f", with {len(controls) + len(additions)} calibration controls" if controls else ""), flush=True)
    judge_all(judge.client, cfg, questions, answer_entries(log) + [(c["question"], c) for c in controls])
    if cfg["groundedness"]:
        deepest = list(given)[-1]            # the largest top-k: the documents an addition control is checked against
        judge_groundedness(judge.client, cfg, [(entry, given[condition][q]) for condition in list(given)[1:]
                                               for q, entry in answer_entries(log, condition)]
                           + [(c, given[deepest][c["question"]]) for c in additions])
    return controls, additions


def summarise(cfg, args, systems, log, controls, additions, conditions) -> dict:
    """Per system and condition the metrics with their bootstrap intervals, the model under test against each
    baseline (paired), and the judge's calibration."""
    resamples = metrics.resample_indices(len(log), cfg["bootstrap_resamples"], args.seed)
    rows = {s.name: {condition: [row["systems"][s.name][condition] for row in log] for condition in conditions}
            for s in systems}
    summary = {name: {condition: {**metrics.summarise(answers),
                                  "intervals": metrics.bootstrap_intervals(answers, resamples)}
                      for condition, answers in by_condition.items()} for name, by_condition in rows.items()}
    tested, *baselines = systems
    comparisons = [{"system": tested.name, "baseline": base.name, "condition": condition,
                    **metrics.paired_comparison(rows[tested.name][condition], rows[base.name][condition], resamples)}
                   for base in baselines for condition in conditions]
    for comparison, adjusted in zip(comparisons, metrics.holm([c["mcnemar_p"] for c in comparisons])):
        comparison.update(mcnemar_p_holm=adjusted, significant=adjusted < 0.05, comparisons=len(comparisons))
    trust = calibration.summary(controls, cfg["judge_min_rate"], additions) if controls else None
    return {"judge_calibration": trust, "systems": summary, "comparisons": comparisons}


def say_where_answers_came_from(system: Endpoint):
    """A re-served model with the same name gets a new fingerprint, so its answers are asked again: say which."""
    usage = system.client.usage
    if usage.cached and not usage.sent:
        print(f"  every answer of {system.name} came from the cache (model fingerprint {system.client.fingerprint} "
              "unchanged)", flush=True)
    elif usage.cached:
        print(f"  {usage.cached} answers of {system.name} came from the cache, {usage.sent} were asked", flush=True)


def write_outputs(output: Path, results: dict, log: list[dict], controls: list[dict]) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(output / "questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in log)
    if controls:           # every control answer with the judge's reply, to see where the judge goes wrong
        with open(output / "calibration.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in controls)
    plots = report.write_plots(results["systems"], output)
    written = [output / "metrics.json", output / "questions.jsonl", report.write_report(output, results, log), *plots]
    return written + ([output / "calibration.jsonl"] if controls else [])


def print_summary(results, endpoints, paths, seconds):
    """What the run found, most important first: can the judge be trusted, the systems with their intervals,
    which differences are real."""
    print()
    for line in report.calibration_lines(results["judge_calibration"], results["settings"]["judge_model"]):
        print(line.replace("**", ""))
    for columns in report.TABLES:
        print(f"\n{'system':28} {'condition':11} " + " ".join(f"{title:>19}" for _, title in columns))
        for name, conditions in results["systems"].items():
            for condition, m in conditions.items():
                print(f"{name[:28]:28} {report.condition_label(condition):11} "
                      + " ".join(f"{report.with_interval(m.get(key), m['intervals'].get(key)):>19}"
                                 for key, _ in columns))
    for comparison in results["comparisons"]:
        print(report.comparison_sentence(comparison))
    if results["training_overlap"]:
        print(report.overlap_line(results["training_overlap"]))
    for kind, recalls in results["retrieval"].items():
        print(f"answer support {kind:7} " + "  ".join(f"{k} {v:.2f}" for k, v in recalls.items() if v is not None))
    for e in endpoints:
        u = e.client.usage
        print(f"requests {e.role} {e.name}: {u.sent} sent, {u.cached} from the cache, {u.retries} retries, "
              f"{u.failed} failed, {u.truncated} cut at max_tokens")
    print(f"time {seconds:.1f} s; wrote {', '.join(str(p) for p in paths)}")


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), "interrupted: finished replies are kept in the output folder's cache; "
                                           "run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
