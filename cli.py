"""The command-line layer the scripts share: the flags of the model client and of the document sources, the
client built from the config and flags, and main()'s mapping of errors to exit codes.

  exit 0    done
  exit 2    a user error (errors.ToolkitError): one line on stderr that says what to fix, no traceback
  exit 130  interrupted (Ctrl-C): one line that says what was kept
"""
import os
import sys
from typing import Callable, Optional, Sequence

from errors import LLMFatalError, ToolkitError
from llm_client import ChatClient

EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def run_main(run: Callable[[object], int], args, interrupted: str = "") -> int:
    """run(args), with a user error printed as one line (exit 2) and Ctrl-C as `interrupted` (exit 130)."""
    try:
        return run(args)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"\n{interrupted}" if interrupted else "", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_source_flags(parser, reads_run_record: bool):
    """The documents and their chunking (config.SOURCE_KEYS, same names). raft_eval.py and chat.py read them from
    the generation run named by --raft_run, so that retrieval sees the chunks the teacher was asked about."""
    parser.add_argument("-d", "--data_dir", help="documents folder")
    parser.add_argument("--xml_path", help="local sitemap XML whose pages are fetched")
    parser.add_argument("--insecure", action="store_const", const=False, dest="verify_ssl",
                        help="do not verify TLS certificates of sitemap pages")
    parser.add_argument("--chunk_size", type=int, help="characters per chunk" + (
        " (default: the generation run's, see --raft_run)" if reads_run_record else ""))
    if reads_run_record:
        parser.add_argument("--raft_run", help="raft.py's output folder (or its raft_run.json): its documents, "
                                               "chunking and refusal answer are used (default: raft.yaml's)")


def add_client_flags(parser):
    """The flags of the client keys (config.CLIENT_KEYS, same names), the API key and --no_preflight."""
    parser.add_argument("-k", "--api_key", default="EMPTY", help="API key; the API_KEY environment variable wins over it")
    parser.add_argument("--max_in_flight", type=int, help="requests in flight at once, over every server")
    parser.add_argument("--rpm", type=int, help="requests per minute limit (your API plan's)")
    parser.add_argument("--tpm", type=int, help="tokens per minute limit (your API plan's)")
    parser.add_argument("--timeout", type=float, dest="request_timeout", help="seconds per request")
    parser.add_argument("--max_retries", type=int, help="retries of a failed request (429s excepted)")
    parser.add_argument("--rate_limit_wait", type=float,
                        help="seconds a request may wait out HTTP 429s in all before it is dropped")
    parser.add_argument("--no_preflight", action="store_true",
                        help="do not ask /models first (gateways that do not list models): then -m is needed")


def client_from_config(cfg: dict, args, urls: Sequence[str], model: str, cache_path: Optional[str],
                       **overrides) -> ChatClient:
    """A client with the config's client keys (flags already merged in) and the key from API_KEY or -k."""
    settings = dict(urls=list(urls), api_key=os.environ.get("API_KEY") or args.api_key, model=model or "",
                    max_in_flight=cfg["max_in_flight"], timeout=cfg["request_timeout"],
                    max_retries=cfg["max_retries"], rpm=cfg["rpm"], tpm=cfg["tpm"],
                    rate_limit_wait=cfg["rate_limit_wait"], cache_path=cache_path)
    return ChatClient(**{**settings, **overrides})


def connect(client: ChatClient, args) -> str:
    """The model name to use: checked against /models (preflight), or, with --no_preflight, the one given."""
    if not getattr(args, "no_preflight", False):
        return client.preflight()
    if not client.model:
        raise LLMFatalError("--no_preflight needs the model name: pass it with -m")
    return client.model
