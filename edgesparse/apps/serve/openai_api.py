"""OpenAI request bodies: parsed, type-checked and turned into sampling options.

Every field is either honoured, or accepted only at its neutral value (``n: 1``,
``logprobs: false``, ...), or refused with a 400 that names it: a client never gets a
silently different answer from the one it asked for."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ...sampling import SEED_RANGE, SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted only at these values (a list: any of them). ``user`` and ``metadata``-like fields are
# identifiers for the client's own bookkeeping and change nothing here.
NEUTRAL = {"n": [1], "logprobs": [False, 0], "top_logprobs": [0], "frequency_penalty": [0], "presence_penalty": [0],
           "logit_bias": [{}], "tools": [[]], "tool_choice": ["none", "auto"], "functions": [[]],
           "response_format": [{"type": "text"}], "echo": [False], "best_of": [1], "suffix": [""]}
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
            "ignore_eos", "stream", "stream_options", "user"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "parallel_tool_calls", "n", "logprobs",
                          "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "tools",
                          "tool_choice", "functions", "response_format"}
TEXT_FIELDS = SAMPLING | {"prompt", "n", "logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
                          "echo", "best_of", "suffix"}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    chat: bool
    messages: list[dict] | None
    prompt: str | None
    params: SamplingParams        # max_new_tokens is set once the prompt's length is known
    max_tokens: int | None        # None: whatever context is left after the prompt
    stream: bool
    include_usage: bool

    @property
    def prompt_field(self) -> str:
        return "messages" if self.chat else "prompt"


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply") from None
    except ValueError as e:     # JSONDecodeError and UnicodeDecodeError
        raise RequestError(f"malformed JSON body: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    where = _invalid_unicode(body)
    if where is not None:
        raise RequestError(f"'{where}' holds invalid Unicode (a lone surrogate)", where)
    return body


def _invalid_unicode(body) -> str | None:
    """Path of the first string (or key) that cannot be UTF-8 encoded, e.g. ``"\\ud800"``."""
    todo = [("", body)]
    while todo:
        path, v = todo.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            sub = f"{path}.{k}" if isinstance(k, str) and path else k if isinstance(k, str) else f"{path}[{k}]"
            if isinstance(k, str) and not _utf8(k):
                return path or "body"
            if isinstance(x, str) and not _utf8(x):
                return sub
            if isinstance(x, (dict, list)):
                todo.append((sub, x))
    return None


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _get(body, name, types, what, default=None):
    v = body.get(name)
    if v is None:
        return default
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        raise RequestError(f"'{name}' must be {what}", name)
    return v


def _check_fields(body: dict, allowed: set, model_id: str) -> None:
    for name in body:
        if name not in allowed:
            raise RequestError(f"unsupported field '{name[:60]}'", name[:60])
    for name, ok in NEUTRAL.items():
        v = body.get(name)
        if v is not None and not any(isinstance(v, bool) == isinstance(o, bool) and v == o for o in ok):
            raise RequestError(f"'{name}' = {_short(v)} is not supported; this server accepts only "
                               f"{' or '.join(json.dumps(o) for o in ok)}", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    if model not in (None, model_id):
        raise RequestError(f"model {_short(model)} does not exist; this server has '{model_id}'", "model",
                           code="model_not_found")
    _get(body, "user", (str,), "a string")
    _get(body, "parallel_tool_calls", (bool,), "a boolean")


def _number(body, name, default, ok, where: str):
    """A numeric field, ``default`` when absent, a 400 naming it when ``ok(v)`` fails."""
    v = _get(body, name, (int, float), "a number", default)
    if not ok(v):
        raise RequestError(f"'{name}' must be in {where}, got {_short(v)}", name)
    return v


def _sampling(body: dict, max_tokens_field: str, defaults: dict) -> tuple[SamplingParams, int | None, bool, bool]:
    """``defaults``: the checkpoint's generation config, for the fields the request leaves out
    (as vLLM does); OpenAI's neutral values where it has none."""
    max_tokens = _get(body, max_tokens_field, (int,), "a positive integer")
    if max_tokens_field != "max_tokens" and max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), "a positive integer")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"'max_tokens' must be a positive integer, got {_short(max_tokens)}", "max_tokens")
    temperature = _number(body, "temperature", defaults.get("temperature", 1.0), lambda v: 0 <= v <= 100, "[0, 100]")
    top_p = _number(body, "top_p", defaults.get("top_p", 1.0), lambda v: 0 < v <= 1, "(0, 1]")
    top_k = _get(body, "top_k", (int,), "an integer", int(defaults.get("top_k", 0)))
    if top_k < -1:
        raise RequestError(f"'top_k' must be >= 0 (or -1 for off), got {top_k}", "top_k")
    min_p = _number(body, "min_p", defaults.get("min_p", 0.0), lambda v: 0 <= v <= 1, "[0, 1]")
    rep = _number(body, "repetition_penalty", defaults.get("repetition_penalty", 1.0), lambda v: 0 < v <= 10, "(0, 10]")
    seed = _get(body, "seed", (int,), "an integer")
    if seed is not None and seed not in SEED_RANGE:
        raise RequestError(f"'seed' must be in [-2**63, 2**64), got {_short(seed)}", "seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    # vLLM's and llama.cpp's extension: decode to max_tokens through end-of-sequence tokens
    # (benchmarks); 'stop' strings still apply
    ignore_eos = _get(body, "ignore_eos", (bool,), "a boolean", False)
    stream = _get(body, "stream", (bool,), "a boolean", False)
    opts = _get(body, "stream_options", (dict,), "an object")
    include_usage = False
    if opts is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
        if set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
            raise RequestError("'stream_options' takes only 'include_usage' (a boolean)", "stream_options")
        include_usage = opts.get("include_usage", False)
    params = SamplingParams(max_new_tokens=1, temperature=float(temperature), top_p=float(top_p),
                            top_k=max(top_k, 0), min_p=float(min_p), repetition_penalty=float(rep), seed=seed,
                            stop=stop, stop_token_ids=[] if ignore_eos else None)
    return params, max_tokens, stream, include_usage


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{at}' must be an object with 'role' and 'content'", at)
        for k in m:
            if k not in ("role", "content", "name"):
                raise RequestError(f"unsupported field '{at}.{k[:40]}'", f"{at}.{k[:40]}")
        role = m.get("role")
        if role == "tool" or role == "function":
            raise RequestError(f"'{at}.role' {role!r} is not supported: this server has no tool calling",
                               f"{at}.role")
        if role not in ROLES:
            raise RequestError(f"'{at}.role' must be one of {', '.join(ROLES)}", f"{at}.role")
        content = _content(m.get("content"), at)
        msg = {"role": ROLES[role], "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise RequestError(f"'{at}.name' must be a string", f"{at}.name")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _content(content, at: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"{at}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(f"'{where}' must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                   "this model reads text only", f"{where}.type")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise RequestError(f"'{where}' must hold exactly 'type' and a string 'text'", f"{where}.text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"'{at}.content' must be a string or a list of text parts", f"{at}.content")


def parse_chat(body: dict, model_id: str, defaults: dict | None = None) -> Parsed:
    _check_fields(body, CHAT_FIELDS, model_id)
    messages = _messages(body)
    params, max_tokens, stream, usage = _sampling(body, "max_completion_tokens", defaults or {})
    return Parsed(True, messages, None, params, max_tokens, stream, usage)


def parse_completion(body: dict, model_id: str, defaults: dict | None = None) -> Parsed:
    _check_fields(body, TEXT_FIELDS, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise RequestError("'prompt' must be one string (batches and token-id prompts are not supported)",
                           "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string", "prompt")
    params, max_tokens, stream, usage = _sampling(body, "max_tokens", defaults or {})
    return Parsed(False, None, prompt, params, max_tokens, stream, usage)
