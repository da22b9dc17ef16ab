"""How five real OpenAI-compatible servers answer, for the scripted server (tests/fake_server.py, persona=...).

Each persona was written from that server's source or published schema; what it says of each:
- vllm     vllm-project/vllm, vllm/entrypoints/openai (serving_models.py, protocol.py, serving_chat.py) after the
           v0.10.1 error shape (PR #22099) and the reasoning rename (PR #27752): /v1/models entries with owned_by
           "vllm", root (the weights' path), parent, max_model_len and a permission list whose "modelperm-<uuid>"
           id and created time are new on every call; every response field present, nulls included
           (model_dump), stop_reason beside finish_reason; with --reasoning-parser the thinking in
           message.reasoning and content null when the reply is cut inside it; stream: a first chunk with the
           role and "" content, usage only with stream_options (include_usage then defaults to true) in a last
           chunk with no choices; errors {"error": {"message", "type": "NotFoundError", "param", "code": 404}};
           a wrong key is 401 {"error": "Unauthorized"}; no 429 (requests queue).
- openai   the OpenAI API reference (chat completions, models, errors): created fixed per model, owned_by
           "system"; refusal and annotations in the message; service_tier and system_fingerprint; errors with
           string codes (model_not_found, context_length_exceeded, rate_limit_exceeded) and x-ratelimit-* headers.
- llamacpp ggml-org/llama.cpp tools/server (server.cpp, utils.hpp, 2025): /v1/models with an Ollama-style
           "models" list beside "data", entries with owned_by "llamacpp", created = the time of the call and a
           "meta" object (n_params, size, n_ctx_train, ...); /props with model_path; responses in its key order,
           system_fingerprint "b<build>-<hash>", timings; reasoning_content only when non-empty; stream: first
           delta {"role": "assistant", "content": null}; errors {"error": {"code", "message", "type"}};
           unknown model names are accepted (one model); no 429.
- ollama   ollama/ollama openai/openai.go, middleware/openai.go: ids chatcmpl-<0..998>, system_fingerprint
           "fp_ollama", message.reasoning; stream: no role-only chunk, every delta carries the role, usage only
           with include_usage; errors {"error": {"message", "type", "param": null, "code": null}}, a missing model
           404 'model "x" not found, try pulling it first', busy 503; no key check.
- tgi      huggingface/text-generation-inference router (lib.rs, server.rs, v2.3-2.4): created 0 and owned_by
           the model id on /v1/models; "object" first and an empty "id"; finish_reason "stop_sequence" for a
           stop string; every stream chunk with "usage": null and the role; errors NOT OpenAI-shaped:
           {"error": "...", "error_type": "validation"} (422 for a prompt too long), 429 "Model is overloaded"
           without Retry-After; no reasoning parsing (a <think> block stays in the content).
- plain    the minimal server the tests were first written against: id/object/created entries, usage always.
"""
import random
import time
import uuid

PERSONAS = ("vllm", "openai", "llamacpp", "ollama", "tgi")


def model_entry(persona: str, model: str, info: dict) -> dict:
    """One /v1/models entry; `info` adds fields (a model's root, llama.cpp's meta)."""
    now = int(time.time())
    if persona == "vllm":
        return {"id": model, "object": "model", "created": now, "owned_by": "vllm", "root": f"/models/{model}",
                "parent": None, "max_model_len": 8192,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                                "organization": "*", "group": None, "is_blocking": False}], **info}
    if persona == "openai":
        return {"id": model, "object": "model", "created": 1721172741, "owned_by": "system", **info}
    if persona == "llamacpp":
        return {"id": model, "object": "model", "created": now, "owned_by": "llamacpp",
                "meta": {"vocab_type": 2, "n_vocab": 49152, "n_ctx_train": 8192, "n_embd": 576,
                         "n_params": 134515008, "size": 90324480, **info.get("meta", {})}}
    if persona == "ollama":
        return {"id": model, "object": "model", "created": 1718400000, "owned_by": "library", **info}
    if persona == "tgi":
        return {"id": model, "object": "model", "created": 0, "owned_by": model, **info}
    return {"id": model, "object": "model", "created": now, **info}


def listing(persona: str, entries: list[dict]) -> dict:
    if persona == "llamacpp":
        models = [{"name": e["id"], "model": e["id"], "modified_at": "", "size": "", "digest": "", "type": "model",
                   "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "",
                   "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                               "parameter_size": "", "quantization_level": ""}} for e in entries]
        return {"models": models, "object": "list", "data": entries}
    if persona == "ollama" and not entries:
        return {"object": "list", "data": None}
    return {"object": "list", "data": entries}


def props(model_path: str) -> dict:
    """llama.cpp's /props."""
    return {"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": 8192, "params": {}},
            "total_slots": 8, "model_path": model_path, "modalities": {"vision": False, "audio": False},
            "chat_template": "{{ messages }}", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "build_info": "b6123-1a2b3c4d"}


def completion_id(persona: str, number: int) -> str:
    if persona == "ollama":
        return f"chatcmpl-{random.randrange(999)}"
    if persona == "tgi":
        return ""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int, persona: str) -> dict:
    counts = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if persona == "vllm":
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "prompt_tokens_details": None}
    if persona == "openai":
        return {**counts, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
    if persona == "llamacpp":
        return {**counts, "prompt_tokens_details": {"cached_tokens": 0}}
    return counts


def message(persona: str, content, reasoning) -> dict:
    """The reply's message. Where a server parses reasoning, the thinking goes into its own field; TGI's stays in
    the content as a <think> block."""
    if persona == "vllm":
        return {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
                "function_call": None, "tool_calls": [], "reasoning": reasoning}
    if persona == "openai":
        return {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if persona == "llamacpp":
        return {"role": "assistant", **({"reasoning_content": reasoning} if reasoning else {}), "content": content}
    if persona == "ollama":
        return {"role": "assistant", "content": content or "", **({"reasoning": reasoning} if reasoning else {})}
    if persona == "tgi" and reasoning:
        return {"role": "assistant", "content": f"<think>{reasoning}</think>{content or ''}"}
    return {"role": "assistant", "content": content}


def completion(persona: str, number: int, model: str, content, reasoning, finish: str, counts: tuple) -> dict:
    choice = {"index": 0, "message": message(persona, content, reasoning), "finish_reason": finish}
    now = int(time.time())
    if persona == "vllm":
        return {"id": completion_id(persona, number), "object": "chat.completion", "created": now, "model": model,
                "choices": [{**choice, "logprobs": None, "stop_reason": None}], "service_tier": None,
                "system_fingerprint": None, "usage": usage(*counts, persona), "prompt_logprobs": None,
                "kv_transfer_params": None}
    if persona == "openai":
        return {"id": completion_id(persona, number), "object": "chat.completion", "created": now,
                "model": f"{model}-2024-07-18", "choices": [{**choice, "logprobs": None}],
                "usage": usage(*counts, persona), "service_tier": "default", "system_fingerprint": "fp_0ba0d124f1"}
    if persona == "llamacpp":
        return {"choices": [{"finish_reason": finish, "index": 0, "message": choice["message"]}], "created": now,
                "model": model, "system_fingerprint": "b6123-1a2b3c4d", "object": "chat.completion",
                "usage": usage(*counts, persona), "id": completion_id(persona, number),
                "timings": {"prompt_n": counts[0], "prompt_ms": 30.9, "predicted_n": counts[1],
                            "predicted_ms": 60.2, "predicted_per_second": 49.9}}
    if persona == "ollama":
        return {"id": completion_id(persona, number), "object": "chat.completion", "created": now, "model": model,
                "system_fingerprint": "fp_ollama", "choices": [choice], "usage": usage(*counts, persona)}
    if persona == "tgi":
        return {"object": "chat.completion", "id": "", "created": now, "model": model,
                "system_fingerprint": "2.4.0-native", "choices": [{**choice, "logprobs": None}],
                "usage": usage(*counts, persona)}
    return {"id": f"cmpl-{number}", "object": "chat.completion", "model": model, "choices": [choice],
            "usage": usage(*counts, persona)}


def stream_chunks(persona: str, number: int, model: str, pieces: list[str], reasoning, finish: str,
                  counts: tuple, include_usage: bool) -> list[dict]:
    """The server-sent events of one streamed reply, [DONE] excluded."""
    cid, now = completion_id(persona, number), int(time.time())

    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if persona in ("vllm", "openai", "tgi"):
            choice["logprobs"] = None
        head = {"object": "chat.completion.chunk", "id": cid} if persona == "tgi" else \
            {"id": cid, "object": "chat.completion.chunk"}
        return {**head, "created": now, "model": model, "choices": [choice],
                **({"usage": None} if persona == "tgi" else {}), **extra}

    role_on_every_delta = persona in ("ollama", "tgi")
    events = []
    if not role_on_every_delta:
        events.append(chunk({"role": "assistant", "content": None if persona == "llamacpp" else ""}))
    if reasoning and persona in ("vllm", "llamacpp", "ollama"):
        field = {"vllm": "reasoning", "llamacpp": "reasoning_content", "ollama": "reasoning"}[persona]
        events.append(chunk({**({"role": "assistant"} if role_on_every_delta else {}), field: reasoning}))
    if reasoning and persona == "tgi":
        pieces = [f"<think>{reasoning}</think>", *pieces]
    for piece in pieces:
        events.append(chunk({**({"role": "assistant"} if role_on_every_delta else {}), "content": piece}))
    final = chunk({"role": "assistant", "content": ""} if role_on_every_delta else {}, finish)
    if persona == "tgi" and include_usage:
        final["usage"] = usage(*counts, persona)
    events.append(final)
    if include_usage and persona != "tgi":
        events.append({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model, "choices": [],
                       "usage": usage(*counts, persona)})
    return events


def wants_usage(persona: str, body: dict) -> bool:
    """Whether a streamed reply ends with usage: only when asked (vLLM: any stream_options asks, by default)."""
    options = body.get("stream_options")
    if persona == "vllm" and isinstance(options, dict):
        return options.get("include_usage", True)
    return bool(isinstance(options, dict) and options.get("include_usage"))


def error(persona: str, status: int, kind: str, message: str) -> tuple[int, dict, dict]:
    """(status, body, headers) of an error, in the server's own shape. `kind` is one of model_not_found,
    context_length, rate_limited, overloaded, unauthorized, server_error."""
    if persona == "tgi":
        tgi = {"context_length": (422, "validation"), "rate_limited": (429, "overloaded"),
               "overloaded": (429, "overloaded"), "server_error": (500, "incomplete_generation")}
        status, error_type = tgi.get(kind, (status, "generation"))
        text = "Model is overloaded" if error_type == "overloaded" else message
        return status, {"error": text, "error_type": error_type}, {}
    if persona == "vllm":
        if kind == "unauthorized":
            return 401, {"error": "Unauthorized"}, {}
        names = {404: "NotFoundError", 400: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
        return status, {"error": {"message": message, "type": names.get(status, "BadRequestError"),
                                  "param": "model" if kind == "model_not_found" else None, "code": status}}, {}
    if persona == "openai":
        codes = {"model_not_found": "model_not_found", "context_length": "context_length_exceeded",
                 "rate_limited": "rate_limit_exceeded", "unauthorized": "invalid_api_key"}
        headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
                   "x-ratelimit-reset-requests": "120ms"} if kind == "rate_limited" else {}
        kind_name = "tokens" if kind == "rate_limited" else "server_error" if status >= 500 else "invalid_request_error"
        return status, {"error": {"message": message, "type": kind_name, "param": None,
                                  "code": codes.get(kind)}}, headers
    if persona == "llamacpp":
        types = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 503: "unavailable_error", 500: "server_error"}
        return status, {"error": {"code": status, "message": message, "type": types.get(status, "server_error")}}, {}
    if persona == "ollama":
        types = {400: "invalid_request_error", 404: "not_found_error"}
        return status, {"error": {"message": message, "type": types.get(status, "api_error"), "param": None,
                                  "code": None}}, {}
    return status, {"error": {"message": message}}, {}


def model_not_found(persona: str, model: str) -> tuple[int, dict, dict]:
    if persona == "ollama":
        return error(persona, 404, "model_not_found", f'model "{model}" not found, try pulling it first')
    if persona == "openai":
        return error(persona, 404, "model_not_found",
                     f"The model `{model}` does not exist or you do not have access to it.")
    return error(persona, 404, "model_not_found", f"The model `{model}` does not exist.")
