"""Chat with the fine-tuned model over your documents: in the terminal, on a web page, or through an API.

  python chat.py -u http://localhost:8000/v1 -m raft-8b                # the terminal, with a vLLM / llama.cpp server
  python chat.py --model_path output/demo/hf                           # no server: transformers in this process
  python chat.py -u http://localhost:8000/v1 --question "What is RAFT?" --json   # one shot, for scripts
  python chat.py -u http://localhost:8000/v1 --web                     # a chat page on http://127.0.0.1:7860
  python chat.py -u http://localhost:8000/v1 --serve                   # an OpenAI-compatible RAG endpoint on :8090

Each question goes through the same retriever and RAG prompt as the evaluation (raft_eval_config.yaml, -c): the
top -r chunks of the documents become the <DOCUMENT>s of the prompt. The reply streams in; by default only the
part after <ANSWER>: is shown (--show-reasoning shows the chain of thought, --sources the retrieved chunks).
When the model declines (raft.yaml's refusal answer, or "I don't know"), chat.py says so and prints a line
starting with "[handoff]", so a person can take over; in one-shot mode the exit code is then 3, and --json
sets "handoff": true. An answer that quotes nothing of its sources gets a line starting with "[unquoted]" (--json:
"unquoted": true, and "quote_support", the share of its quotes found in them). An empty line asks again; Ctrl-C stops the current answer; Ctrl-D or "exit" quits.
The web page (web_chat.py) and the endpoint (rag_server.py) are described in their own files.
"""
import argparse
import ipaddress
import json
import os
import signal
import sys

from assistant import Assistant, open_model
from cli import add_client_flags, add_source_flags, client_from_config, connect, run_main
from config import load_eval_config
from errors import ConfigError, LLMFatalError

DEFAULT_URL = "http://localhost:8000/v1"
HANDOFF = "[handoff] The documents do not answer this question: please pass it to a person."
UNQUOTED = "[unquoted] No part of this answer is quoted from its sources: check it against them (--sources)."
EXIT_HANDOFF = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="raft_eval_config.yaml", help="retrieval and prompt settings")
    p.add_argument("-u", "--url", default=DEFAULT_URL, help=f"API base URL of the model (default {DEFAULT_URL})")
    p.add_argument("-m", "--model", help="served model name (default: the only model at -u)")
    p.add_argument("--model_path", help="a Hugging Face model folder to run in this process instead of a server")
    p.add_argument("-r", "--topk", type=int, help="chunks retrieved per question (default: rag_topk's first value)")
    add_source_flags(p, reads_run_record=True)
    p.add_argument("--retriever", help="hybrid, dense or bm25")
    p.add_argument("--reranker", help="none, llm, or a CrossEncoder name or folder (rerank.py)")
    p.add_argument("--rerank_url", help="the model server of reranker llm (default: -u)")
    p.add_argument("--no-rag", dest="rag", action="store_false", help="ask the model without retrieved documents")
    p.add_argument("--show-reasoning", action="store_true", help="show the whole reply, chain of thought included")
    p.add_argument("--sources", action="store_true", help="list the retrieved chunks' sources after each answer")
    p.add_argument("--question", help="answer this one question and exit (exit code 3: handed off)")
    p.add_argument("--json", action="store_true", help="with --question: print one JSON object instead of text")
    p.add_argument("--max_tokens", type=int, dest="answer_max_tokens", help="longest reply, in tokens")
    add_client_flags(p)
    web = p.add_argument_group("the web page (--web) and the RAG endpoint (--serve)")
    web.add_argument("--web", action="store_true", help="serve a chat page (Gradio) instead of the terminal")
    web.add_argument("--serve", action="store_true", help="serve an OpenAI-compatible RAG endpoint instead")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, help="port (default 7860 for --web, 8090 for --serve)")
    web.add_argument("--share", action="store_true", help="--web: also open Gradio's public share link")
    web.add_argument("--concurrency", type=int, help="answers written at once; more people wait in line")
    web.add_argument("--queue_size", type=int, help="requests that may wait in line; more get 429 (busy)")
    web.add_argument("--queue_wait", type=float, help="seconds a request may wait in line before it gets 429")
    web.add_argument("--max_request_bytes", type=int, help="--serve: largest request body (413 above it)")
    web.add_argument("--max_question_chars", type=int, help="--serve: longest question (400 above it)")
    web.add_argument("--max_messages", type=int, help="--serve: most messages in a request (400 above it)")
    web.add_argument("--request_max_tokens", type=int, help="--serve: largest max_tokens a request may ask for")
    web.add_argument("--allowed_hosts", nargs="+", help="--serve: host names requests may be addressed to, besides "
                                                        "the bound address and localhost")
    web.add_argument("--allowed_origins", nargs="+", help="--serve: web origins whose pages may call the endpoint")
    web.add_argument("--web_login", help="--web: USER:PASSWORD people must log in with (or the RAG_WEB_LOGIN "
                                         "environment variable)")
    web.add_argument("--allow_unauthenticated_network_access", action="store_true",
                     help="listen on an address other machines reach (or --share) with no key or login: anyone who "
                          "reaches it reads your documents")
    web.add_argument("--handoff_log", default="output/chat/handoffs.jsonl",
                     help="--web: every hand-off appended here (time, question, sources) for a support team")
    web.add_argument("--feedback_log", default="output/chat/feedback.jsonl",
                     help="--web: every thumbs up/down appended here (the eval file's format plus the verdict)")
    web.add_argument("--server_api_key", help="--serve: the key clients must send (or the RAG_SERVER_API_KEY "
                                              "environment variable); none: no key needed")
    return p.parse_args(argv)


# ---- the terminal ------------------------------------------------------------------------------------------------
def ask(assistant: Assistant, model, question: str, show_reasoning: bool, out) -> dict:
    """Stream one answer to `out` (None: print nothing) and return what a caller needs to know about it."""
    turn = assistant.start(question)
    shown = ""
    for _ in assistant.stream(turn, model):
        if out:
            shown = print_more(turn.visible(show_reasoning), shown, out)
    if out:
        print_more(turn.visible(show_reasoning, finished=True), shown, out)
        out.write("\n")
        out.flush()
    return assistant.finish(turn)


def print_more(visible: str, shown: str, out) -> str:
    """Write what is new in the visible text; returns what is on screen now."""
    if len(visible) > len(shown):
        out.write(visible[len(shown):])
        out.flush()
        return visible
    return shown


def print_sources(sources, out):
    for s in sources:
        snippet = " ".join(s["text"].split())[:90]
        out.write(f"  [{s['rank']}] {s['source']}: {snippet}…\n")


def one_shot(assistant, model, args) -> int:
    result = ask(assistant, model, args.question, args.show_reasoning, None if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"model": model.name, **result}, ensure_ascii=False))
    else:
        print_flags(result, args)
    return EXIT_HANDOFF if result["handoff"] else 0


def interactive(assistant, model, args) -> int:
    # Ctrl-C must stop an answer even when the chat was started with SIGINT ignored (from a background job or a
    # script, which Python then leaves ignored): this mode promises it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"RAFT chat with {model.name} ({model.where}; {assistant.describe()}). Ctrl-D or 'exit' quits, "
          "Ctrl-C stops an answer.")
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
        print_flags(result, args)


def print_flags(result: dict, args):
    """After an answer: its sources (--sources), and a line when it hands off or quotes nothing of its sources."""
    if args.sources:
        print_sources(result["sources"], sys.stdout)
    if result["handoff"]:
        print(HANDOFF)
    elif result["unquoted"]:
        print(UNQUOTED)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False          # a host name: reachable from wherever it resolves


def who_may_call(args):
    """--serve: the API key clients must send; --web: the (user, password) people log in with; None for neither.
    Listening where other machines reach it (or --share) without one is an error, unless the user says so with a
    flag whose name says what it means."""
    if args.serve:
        secret = args.server_api_key or os.environ.get("RAG_SERVER_API_KEY")
        what = "an API key (--server_api_key or RAG_SERVER_API_KEY)"
    elif args.web:
        login = args.web_login or os.environ.get("RAG_WEB_LOGIN")
        if login is not None and (":" not in login or not login.split(":", 1)[0] or not login.split(":", 1)[1]):
            raise ConfigError("--web_login (or RAG_WEB_LOGIN) must be USER:PASSWORD")
        secret = tuple(login.split(":", 1)) if login else None
        what = "a login (--web_login USER:PASSWORD or RAG_WEB_LOGIN)"
    else:
        return None
    exposed = not is_loopback(args.host) or (args.web and args.share)
    if exposed and not secret and not args.allow_unauthenticated_network_access:
        where = "a public share link" if args.web and args.share and is_loopback(args.host) else f"{args.host}"
        raise ConfigError(f"{where} is reachable from other machines and anyone there could read your documents: "
                          f"set {what}, or pass --allow_unauthenticated_network_access if that is what you want")
    if exposed and not secret:
        print(f"warning: serving {args.host} with no key or login: anyone who reaches it reads your documents",
              file=sys.stderr, flush=True)
    return secret


def reranker_client(cfg, args):
    """The model server of reranker llm: --rerank_url, else -u (not with --model_path alone)."""
    url = args.rerank_url or (None if args.model_path else args.url)
    if cfg["reranker"] != "llm" or not args.rag or url is None:
        return None
    client = client_from_config(cfg, args, [url], "", None)
    connect(client, args)
    return client


def run(args) -> int:
    cfg = load_eval_config(args.config, args)
    if args.json and not args.question:
        raise ConfigError("--json needs --question (one-shot mode)")
    if sum([args.web, args.serve, bool(args.question)]) > 1:
        raise ConfigError("choose one of --web, --serve and --question")
    topk = args.topk or cfg["rag_topk"][0]
    if topk < 1:
        raise ConfigError(f"-r must be 1 or more, got {topk}")
    secret = who_may_call(args)
    rerank_client = reranker_client(cfg, args)
    assistant = Assistant(cfg, topk, args.rag, rerank_client)
    model = open_model(cfg, args)
    try:
        if args.web:
            import web_chat        # Gradio is imported only for the page
            return web_chat.serve(assistant, model, args, cfg, secret)
        if args.serve:
            import rag_server
            return rag_server.serve(assistant, model, args, cfg, secret)
        return one_shot(assistant, model, args) if args.question else interactive(assistant, model, args)
    finally:
        model.close()
        if rerank_client is not None:
            rerank_client.close()


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
