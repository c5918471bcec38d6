"""`python -m reftjax.serve --model SRC`: an OpenAI-compatible chat-completions (and embeddings) endpoint over any
checkpoint reftjax loads (directory, GGUF, hub id, a run's `hf/best`), offline: the judge of `score_model` /
`label_model` graders (`reftjax.graders.judge`), or a quick way to talk to a trained policy.

    python -m reftjax.serve --model runs/gsm8k_reft_cpu/hf/best --port 8000 &
    curl -s localhost:8000/v1/chat/completions -d '{"model": "best", "messages": [{"role": "user", "content": "Hi"}],
                                                    "temperature": 0, "max_completion_tokens": 32}'

`POST /v1/chat/completions` takes `model` (any name: one model is served), `messages` (the tokenizer's chat
template renders them; `developer` turns as `system`), `temperature` (OpenAI's default 1; 0 is greedy, and
deterministic), `top_p`, `max_completion_tokens` / `max_tokens` (at most `--max-new-tokens`; a reply is cut to it,
while its batch decodes on to its longest reply), `seed`; a null field counts as absent; `n` 1 and `stream` false
only; `stop`, `logprobs`, `tools`, `response_format` and the like are refused when set, hints such as `user`,
`metadata`, `reasoning_effort` and the penalties ignored (`_IGNORED`), and any other field is refused. `GET
/v1/models` lists the served name.

`POST /v1/embeddings` takes `input` (a text or a list of texts, each tokenized as the tokenizer does by default)
and answers one vector per text (OpenAI's embeddings API): the mean of the model's last hidden state (after its
final norm) over the text's tokens, scaled to unit length (mean pooling); `encoding_format` "float" only, no
`dimensions`, at most 2,048 texts a request and `--prompt-buckets`' longest tokens a text. It lets a
`text_similarity` grader's `cosine` run offline; a language model's mean-pooled states are weak embeddings, so for
real grading serve an embedding model (vLLM, text-embeddings-inference). A request's texts run in batches of
`--batch-size` rows, one compiled program per prompt bucket.

Chat requests arriving together run as one batch (`--batch-size` rows, padded, in
one `rollout` call, prompts padded to the smallest of `--prompt-buckets` that holds the longest): one compiled
program per prompt bucket and (temperature, top_p) pair, so a judge with fixed sampling settings compiles once per
bucket. A batch samples with one key (its first request's `seed`, else a counter): only greedy replies are
reproducible request by request.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import itertools
import json
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

log = logging.getLogger("reftjax.serve")
_IGNORED = {"user", "metadata", "store", "reasoning_effort", "frequency_penalty", "presence_penalty", "stream_options",
            "parallel_tool_calls", "service_tier", "model"}
_REFUSED = {"stop", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "logit_bias", "functions",
            "function_call", "audio", "modalities", "prediction"}


MAX_BODY = 16 << 20  # bytes of a request body
MAX_EMBED_INPUTS = 2048  # texts in one embeddings request
TOKENIZER_LOCK = threading.Lock()  # handler threads render, the batcher decodes: one Rust tokenizer, one at a time


class RequestError(ValueError):
    """A request this server cannot serve as asked: HTTP 400 with the message."""


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server settings (the CLI's flags)."""

    batch_size: int = 8
    max_new_tokens: int = 256
    prompt_buckets: tuple[int, ...] = (128, 256, 512, 1024)
    batch_wait_ms: float = 5.0
    chat_template_kwargs: tuple = ()  # sorted (key, value) pairs

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1 or not self.prompt_buckets or min(self.prompt_buckets) < 1:
            raise ValueError(f"batch_size, max_new_tokens and the prompt buckets must be >= 1: {self}")


def seed_key(seed: int):
    """The PRNG key of a request's `seed` (OpenAI's int64 range): `jax.random.key(seed)` from 0 to 2**32 - 1, and
    outside it the key of the low 32 bits folded with the high 32. `jax.random.key` keeps the low 32 bits alone
    (without x64), so 5 and 2**32 + 5, or -5 and 2**32 - 5, sampled alike (session 55's list)."""
    import jax

    low, high = seed % 2**32, (seed >> 32) % 2**32
    key = jax.random.key(low)
    return key if high == 0 else jax.random.fold_in(key, high)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}: content must be text or a list of text parts, got {str(content)[:100]}")


def parse_request(body: Any, tokenizer, cfg: ServeConfig, template_kwargs: dict) -> Request:
    """Checks an OpenAI chat-completions body and renders its messages; raises RequestError naming the field."""
    from reftjax.data.prompts import render_chat

    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # (OpenAI's API takes null as "not given")
    if refused := sorted(k for k in set(body) & _REFUSED if body[k] not in (False, [], {})):
        raise RequestError(f"{refused} are not supported by this server")
    if unknown := sorted(set(body) - _REFUSED - _IGNORED - {"messages", "temperature", "top_p", "max_tokens",
                                                            "max_completion_tokens", "seed", "n", "stream"}):
        raise RequestError(f"unknown fields {unknown}")
    if body.get("stream") or body.get("n", 1) != 1:
        raise RequestError("only n=1 without streaming is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}]: must have a role of system, developer, user or assistant")
        turns.append({"role": "system" if m["role"] == "developer" else m["role"],
                      "content": _text(m.get("content"), f"messages[{i}]")})
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", cfg.max_new_tokens))
    seed = body.get("seed")
    for name, value, ok in (("temperature", temperature, lambda v: 0 <= v <= 2),
                            ("top_p", top_p, lambda v: 0 < v <= 1),
                            ("max_completion_tokens", max_tokens,
                             lambda v: isinstance(v, int) and 1 <= v <= cfg.max_new_tokens),
                            ("seed", seed, lambda v: v is None or (isinstance(v, int) and -2**63 <= v < 2**63))):
        if (value is None and name != "seed") or isinstance(value, bool) or \
                (value is not None and not isinstance(value, (int, float))) or not ok(value):
            limit = f" (this server's --max-new-tokens is {cfg.max_new_tokens})" if name.startswith("max") else ""
            raise RequestError(f"{name}: {value!r} is out of range{limit}")
    try:
        with TOKENIZER_LOCK:
            ids = render_chat(tokenizer, turns, add_generation_prompt=True, tokenize=True, return_dict=False,
                              **template_kwargs)
    except Exception as exc:  # noqa: BLE001 - a template that refuses these turns (e.g. no system role)
        raise RequestError(f"the chat template cannot render these messages: {exc}") from None
    if len(ids) > max(cfg.prompt_buckets):
        raise RequestError(f"the prompt is {len(ids)} tokens, over the longest prompt bucket "
                           f"{max(cfg.prompt_buckets)} (--prompt-buckets)")
    return Request(tuple(int(i) for i in ids), int(max_tokens), float(temperature), float(top_p), seed)


def parse_embeddings(body: Any, tokenizer, cfg: ServeConfig) -> list[tuple[int, ...]]:
    """Checks an OpenAI embeddings body; each text's token ids. Raises RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    if unknown := sorted(set(body) - {"input", "model", "encoding_format", "user", "dimensions"}):
        raise RequestError(f"unknown fields {unknown}")
    if body.get("encoding_format", "float") != "float":
        raise RequestError(f"encoding_format: {body['encoding_format']!r} is not supported (float only)")
    if "dimensions" in body:
        raise RequestError("dimensions: not supported (the model's hidden size is the vector's)")
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise RequestError("input: must be a non-empty text or a non-empty list of non-empty texts (token ids are "
                           "not supported)")
    if len(texts) > MAX_EMBED_INPUTS:
        raise RequestError(f"input: {len(texts)} texts, over {MAX_EMBED_INPUTS} (OpenAI's limit too)")
    with TOKENIZER_LOCK:
        rows = [tuple(int(i) for i in tokenizer(t)["input_ids"]) for t in texts]
    for i, ids in enumerate(rows):
        if not ids or len(ids) > max(cfg.prompt_buckets):
            raise RequestError(f"input[{i}]: {len(ids)} tokens, not 1..{max(cfg.prompt_buckets)} "
                               f"(--prompt-buckets)")
    return rows


def mean_pooled(params, tokens_BxT, mask_BxT, *, model_cfg):
    """Unit-length means of the last hidden state (after the final norm) over each row's tokens (float32)."""
    import jax.numpy as jnp

    from reftjax.models import forward

    _, hidden = forward(params, model_cfg, tokens_BxT, mask_BxT, return_logits=False)
    m = mask_BxT.astype(jnp.float32)[..., None]
    mean = (hidden.astype(jnp.float32) * m).sum(1) / m.sum(1)
    return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)


class Engine:
    """Runs batches of requests through `rollout` (same sampling settings per batch), and embeddings."""

    def __init__(self, params, model_cfg, tokenizer, cfg: ServeConfig):
        self.params, self.model_cfg, self.tokenizer, self.cfg = params, model_cfg, tokenizer, cfg
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = tuple(model_cfg.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                                                 else ())
        if not eos:
            raise ValueError("the model and its tokenizer name no EOS token: every reply would run to "
                             "--max-new-tokens")
        self.eos = eos
        self._calls = itertools.count()
        self._embed_lock = threading.Lock()
        self._pool = None

    def embed(self, rows: Sequence[tuple[int, ...]]) -> list[list[float]]:
        """`mean_pooled` vectors of tokenized texts, `cfg.batch_size` rows a call (the last padded with copies of
        its first), each padded on the left to the smallest prompt bucket that holds its longest row."""
        import functools

        import jax

        from reftjax.rollout import bucket, left_pad
        from reftjax.sharding import to_host

        with self._embed_lock:  # (requests from concurrent handler threads: one program at a time, compiled once)
            if self._pool is None:
                self._pool = jax.jit(functools.partial(mean_pooled, model_cfg=self.model_cfg))
            out = []
            for k in range(0, len(rows), self.cfg.batch_size):
                chunk = [list(r) for r in rows[k:k + self.cfg.batch_size]]
                chunk += [chunk[0]] * (self.cfg.batch_size - len(chunk))
                tokens, mask = left_pad(chunk, bucket(max(map(len, chunk)), self.cfg.prompt_buckets), self.pad)
                vectors = to_host(self._pool(self.params, tokens, mask))
                out += [v.tolist() for v in vectors[:len(rows) - k]]
            return out

    @staticmethod
    def key(r: Request) -> tuple:
        """Requests with the same key share a batch (a compiled program)."""
        return (True, 1.0, 1.0) if r.temperature == 0 else (False, r.temperature, r.top_p)

    def run(self, batch: Sequence[Request]) -> list[dict]:
        import jax

        from reftjax.rollout import SamplingConfig, bucket, left_pad, rollout
        from reftjax.sharding import to_host

        greedy, temperature, top_p = self.key(batch[0])
        sampling = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, greedy=greedy, temperature=temperature,
                                  top_p=top_p, eos_ids=self.eos, pad_id=self.pad)
        rows = [list(r.prompt_ids) for r in batch]
        rows += [rows[0]] * (self.cfg.batch_size - len(rows))
        tokens, mask = left_pad(rows, bucket(max(map(len, rows)), self.cfg.prompt_buckets), self.pad)
        seed = batch[0].seed
        rng = seed_key(seed) if seed is not None else jax.random.fold_in(jax.random.key(0), next(self._calls))
        out = rollout(self.params, tokens, mask, rng, model_cfg=self.model_cfg, cfg=sampling)
        ids, lengths, finished = to_host((out.tokens_BxN, out.lengths_B, out.finished_B))
        replies = []
        for i, r in enumerate(batch):
            n = int(lengths[i])
            done = bool(finished[i]) and n <= r.max_tokens
            n = min(n, r.max_tokens)
            body = ids[i, :n].tolist()
            if done and body and body[-1] in self.eos:
                body = body[:-1]
            with TOKENIZER_LOCK:
                text = self.tokenizer.decode(body, skip_special_tokens=True)
            replies.append({"text": text,
                            "finish_reason": "stop" if done else "length", "prompt_tokens": len(r.prompt_ids),
                            "completion_tokens": n})
        return replies


class Batcher:
    """One thread that takes queued requests, groups those with the same sampling settings (up to the batch size,
    waiting `batch_wait_ms` for more) and runs them on the engine."""

    def __init__(self, engine: Engine):
        self.engine, self.queue = engine, queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="reftjax-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Future:
        fut: Future = Future()
        self.queue.put((request, fut))
        return fut

    def _loop(self):
        held: list = []
        while True:
            first = held.pop(0) if held else self.queue.get()
            batch, key = [first], Engine.key(first[0])
            deadline = time.monotonic() + self.engine.cfg.batch_wait_ms / 1000
            while len(batch) < self.engine.cfg.batch_size:
                same = next((h for h in held if Engine.key(h[0]) == key), None)
                if same is not None:
                    held.remove(same)
                    batch.append(same)
                    continue
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                (batch if Engine.key(item[0]) == key else held).append(item)
            try:
                replies = self.engine.run([r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - answer every waiting request, keep serving
                log.exception("batch of %d failed", len(batch))
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), reply in zip(batch, replies):
                fut.set_result(reply)


def make_handler(name: str, tokenizer, cfg: ServeConfig, batcher: Batcher):
    template_kwargs = dict(cfg.chat_template_kwargs)
    ids = itertools.count()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:  # (a body left unread: the client must not send on this connection)
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str):
            self._send(code, {"error": {"message": message, "type": "invalid_request_error" if code == 400
                                        else "server_error"}})

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "reftjax"}]})
            elif self.path.rstrip("/") in ("/health", ""):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            if self.headers.get("Transfer-Encoding"):  # (chunked bodies: unread chunks were taken for the next request)
                self.close_connection = True
                return self._error(411, "send the body with a Content-Length (no Transfer-Encoding)")
            try:  # the body is read whatever the route (an unread one was taken for the next request on a kept-alive
                length = int(self.headers.get("Content-Length") or 0)  # connection)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True  # (not read: the connection cannot go on)
                got = self.headers.get("Content-Length")
                return self._error(413 if length > MAX_BODY else 400, f"Content-Length must be 0..{MAX_BODY}: {got}")
            raw = self.rfile.read(length)
            if self.path.rstrip("/") in ("/v1/embeddings", "/embeddings"):
                return self._embeddings(raw)
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route {self.path}")
            try:
                request = parse_request(json.loads(raw or b"null"), tokenizer, cfg, template_kwargs)
            except (ValueError, RecursionError, RequestError) as exc:  # (RecursionError: JSON nested too deep)
                return self._error(400, str(exc)[:1000])
            except Exception as exc:  # noqa: BLE001 - an answer, not a dropped connection
                return self._error(500, f"{type(exc).__name__}: {exc}"[:1000])
            try:
                reply = batcher.submit(request).result()
            except Exception as exc:  # noqa: BLE001
                return self._error(500, f"{type(exc).__name__}: {exc}")
            self._send(200, {"id": f"chatcmpl-{next(ids)}", "object": "chat.completion", "created": int(time.time()),
                             "model": name,
                             "choices": [{"index": 0, "finish_reason": reply["finish_reason"],
                                          "message": {"role": "assistant", "content": reply["text"]}}],
                             "usage": {"prompt_tokens": reply["prompt_tokens"],
                                       "completion_tokens": reply["completion_tokens"],
                                       "total_tokens": reply["prompt_tokens"] + reply["completion_tokens"]}})

        def _embeddings(self, raw: bytes):
            try:
                rows = parse_embeddings(json.loads(raw or b"null"), tokenizer, cfg)
            except (ValueError, RecursionError, RequestError) as exc:
                return self._error(400, str(exc)[:1000])
            except Exception as exc:  # noqa: BLE001
                return self._error(500, f"{type(exc).__name__}: {exc}"[:1000])
            try:
                vectors = batcher.engine.embed(rows)
            except Exception as exc:  # noqa: BLE001
                log.exception("embeddings of %d texts failed", len(rows))
                return self._error(500, f"{type(exc).__name__}: {exc}")
            n = sum(map(len, rows))
            self._send(200, {"object": "list", "model": name,
                             "data": [{"object": "embedding", "index": i, "embedding": v}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

        def log_message(self, fmt, *args):  # through logging, not stderr lines per request
            log.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def start_server(params, model_cfg, tokenizer, cfg: ServeConfig = ServeConfig(), *, name: str = "reftjax",
                 host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """Starts serving in a background thread; returns the server (`server.server_address`; port 0 picks a free
    one; `server.shutdown()` stops it)."""
    batcher = Batcher(Engine(params, model_cfg, tokenizer, cfg))
    server = http.server.ThreadingHTTPServer((host, port), make_handler(name, tokenizer, cfg, batcher))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="reftjax-serve", daemon=True).start()
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reftjax.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="checkpoint: HF directory, .gguf file, hub id or default")
    parser.add_argument("--name", default=None,
                        help="the model name it lists and replies with; requests may name any "
                             "(default: the source's name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (requests run together)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply")
    parser.add_argument("--prompt-buckets", default="128,256,512,1024", help="prompt lengths compiled for")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chat-template-kwargs", default="{}", help='e.g. \'{"enable_thinking": false}\'')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        kwargs = json.loads(args.chat_template_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
        cfg = ServeConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          prompt_buckets=tuple(int(b) for b in args.prompt_buckets.split(",") if b.strip()),
                          batch_wait_ms=args.batch_wait_ms, chat_template_kwargs=tuple(sorted(kwargs.items())))
    except ValueError as exc:
        parser.error(str(exc))
    from reftjax.hf import load_model

    model = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype)
    name = args.name or str(args.model).rstrip("/").split("/")[-1]
    server = start_server(model.params, model.config, model.tokenizer, cfg, name=name, host=args.host,
                          port=args.port)
    host, port = server.server_address[:2]
    log.info("serving %s (%s) at http://%s:%d/v1", name, args.model, host, port)
    print(f"serving {name} at http://{host}:{port}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
