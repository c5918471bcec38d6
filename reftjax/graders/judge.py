"""Model-based graders: OpenAI's `score_model` and `label_model`. A judge model reads chat messages rendered from
the item and the sample, and its reply is a score or a label.

The judge is reached over an OpenAI-compatible chat-completions endpoint (`POST {base_url}/chat/completions`):
OpenAI's API itself, a vLLM / SGLang / llama.cpp server, or reftjax's own (`python -m reftjax.serve --model SRC`,
any checkpoint reftjax loads, offline). The trainer process never runs the judge: grading happens in a host
callback inside the jitted rollout, where another JAX computation may not run.

    {"type": "score_model", "name": "judge", "model": "NAME",
     "input": [{"role": "system", "content": "Score the answer from 0 to 10. Reply with the number only."},
               {"role": "user", "content": "Question: {{item.question}}\\nAnswer: {{sample.output_text}}"}],
     "range": [0, 10], "sampling_params": {"temperature": 0, "max_completions_tokens": 16},
     "base_url": "http://127.0.0.1:8000/v1"}
    {"type": "label_model", "model": "NAME", "input": [...], "labels": ["correct", "incorrect"],
     "passing_labels": ["correct"]}

* `score_model`: the reply is read as the `result` (or `score`) of a JSON object that ends it, else as its last line
  if that is a number (`7`, `7/10`, `7 out of 10`: the scale is `range`'s to say) or a score line (`Score: 7`,
  `**Final score:** 7/10`, `Overall rating (0-10) = 7`: up to three words before score / result / rating / grade);
  only the end counts, so a score the sample itself states and the judge quotes earlier is not read. Anything else
  is a grader error (scored 0, counted in `grader_errors`). The score is mapped from `range` (default [0, 1]) onto
  [0, 1]: (s - low) / (high - low), clipped (the first clip is logged).
* `label_model`: the reply (or its last non-empty line), stripped of quotes, `*`, and final punctuation, is matched
  to `labels` ignoring case (the `result` / `label` of a JSON object that ends it too); 1 when that label is in
  `passing_labels`, else 0; a reply that is no label is a grader error.
* `sampling_params` go to the endpoint as they are (`temperature`, `top_p`, `seed`, `reasoning_effort`, ...), but
  OpenAI's grader spelling `max_completions_tokens` is sent as the API's `max_completion_tokens`.
* reftjax's own keys: `base_url` (default: `$REFTJAX_JUDGE_URL`, else `$OPENAI_BASE_URL`, else
  https://api.openai.com/v1), `api_key_env` (the environment variable holding the key, default `OPENAI_API_KEY`; a
  key itself is refused in the config, which a run writes to its `config.json`), `timeout` (seconds per request,
  default 120, at most a day), `max_concurrency` (requests in flight, default 16), `retries` (after a connection
  error, a timeout, 408, 409, 429 or 5xx: waiting 0.5 s, doubling, at most 30 s, or the endpoint's `Retry-After` up
  to a minute; default 3). Null fields count as absent; a message's content may be OpenAI's list of text blocks.

`text_similarity` with `evaluation_metric: "cosine"` (`CosineGrader`) asks an OpenAI-compatible embeddings endpoint
(`POST {base_url}/embeddings`) in the same way, with the same endpoint keys plus `model` (the embedding model).

Exact resume and the reproducibility of rewards need a deterministic judge: temperature 0 (reftjax's server is
then greedy; hosted models promise less). A judge scores whatever it reads: a policy can learn to persuade it
(reward hacking), so read `samples/rl_rollouts.jsonl`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

from reftjax.graders.base import Grade, Item, _check_lengths, faulted
from reftjax.graders.openai import ConfigError, SampleFieldMissing, _TEMPLATE, _Templated, check_item_fields, \
    check_template, clip01, render, sample_of

log = logging.getLogger("reftjax.graders")
ROLES = ("system", "developer", "user", "assistant")
DEFAULT_URL = "https://api.openai.com/v1"
# a cosine grader's embedding model when its config names none (OpenAI's grader spec has no such field and does
# not say which model its cosine uses)
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-large"
PING = "(a connection check before training)"  # what check_judges' one request puts in every template field
# (one way to split a run of digits: `\d+\.?\d*` backtracked quadratically on a long one; review E, session 42)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_SCALE = r"(?:\s*/\s*\d+(?:\.\d+)?|\s+out\s+of\s+\d+(?:\.\d+)?)?"  # "/10", "out of 10": range's to say
_BARE = re.compile(r"(" + _NUMBER.pattern + r")" + _SCALE)
# the reply's last line alone: "Score: 7", "**Final score:** 7/10", "Overall rating (0-10) = 0.5."
_SCORE_LINE = re.compile(r"[*#_ ]*(?:[a-z]+\s+){0,3}?(?:score|result|rating|grade)(?:\s*\([^()]{0,30}\))?[*_ ]*[:=]"
                         r"[*_ ]*(" + _NUMBER.pattern + r")" + _SCALE + r"[*_ ]*\.?", re.IGNORECASE)
_LINE_MAX = 200  # characters: a longer line is no score line (and bounds the matching)
_RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
ENDPOINT_KEYS = ("base_url", "api_key_env", "timeout", "max_concurrency", "retries")  # reftjax's own, per grader


def default_base_url() -> str:
    return os.environ.get("REFTJAX_JUDGE_URL") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL


class JudgeError(RuntimeError):
    """The endpoint could not be reached or answered with an error (after the retries). `unreachable`: no answer at
    all (connection refused, timed out) or still busy (429, 5xx) after the retries, not one request refused."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _post_json(url: str, payload: Mapping, *, api_key: str | None, timeout: float, retries: int,
               backoff: float) -> Any:
    """`POST url` with a JSON body; the reply's JSON. Retries connection errors, timeouts, 408/409/429/5xx
    (`backoff` seconds, doubling, or the endpoint's `Retry-After`); raises JudgeError with the endpoint's message."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    body = json.dumps(payload).encode()
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"),
                                        timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code not in _RETRY_STATUS or attempt == retries:
                raise JudgeError(f"{url}: HTTP {exc.code}: {detail}", exc.code in _RETRY_STATUS) from None
            wait = _retry_after(exc.headers.get("Retry-After"))
            if wait is not None:  # a rate limit's own word (429, 503), up to a minute
                time.sleep(wait)
                continue
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
            # (a connection dropped mid-reply raises IncompleteRead / RemoteDisconnected: HTTPException)
            if attempt == retries:
                raise JudgeError(f"{url}: {type(exc).__name__}: {getattr(exc, 'reason', exc)}", True) from None
        except ValueError as exc:  # a body that is not JSON
            raise JudgeError(f"{url}: the reply is not JSON: {exc}") from None
        time.sleep(min(backoff * 2 ** attempt, 30.0))
    raise AssertionError("unreachable")  # (every path of the last attempt returns or raises)


def chat_completion(base_url: str, payload: Mapping, *, api_key: str | None = None, timeout: float = 120,
                    retries: int = 3, backoff: float = 0.5) -> str:
    """The reply text of one chat completion: `POST {base_url}/chat/completions`. Retries connection errors,
    timeouts, 408/409/429/5xx (`backoff` seconds, doubling); raises JudgeError with the endpoint's message."""
    url = base_url.rstrip("/") + "/chat/completions"
    data = _post_json(url, payload, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff)
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"{url}: no choices[0].message.content in the reply {str(data)[:300]}") from None
    if not isinstance(content, str):
        raise JudgeError(f"{url}: the reply's content is {content!r}, not text")
    return content


def embeddings(base_url: str, model: str, texts: Sequence[str], *, api_key: str | None = None,
               timeout: float = 120, retries: int = 3, backoff: float = 0.5) -> list[list[float]]:
    """One embedding per text, in order: `POST {base_url}/embeddings` with `{"model", "input": texts}` (OpenAI's
    embeddings API; vLLM's and text-embeddings-inference's OpenAI routes answer the same). Retries as
    `chat_completion`; a reply without one finite vector of one size per text raises JudgeError."""
    url = base_url.rstrip("/") + "/embeddings"
    data = _post_json(url, {"model": model, "input": list(texts)}, api_key=api_key, timeout=timeout,
                      retries=retries, backoff=backoff)
    try:
        rows = sorted(data["data"], key=lambda row: row["index"])
        vectors = [[float(x) for x in row["embedding"]] for row in rows]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise JudgeError(f"{url}: no data[i].index / .embedding (a list of numbers) in the reply "
                         f"{str(data)[:300]}") from None
    sizes = {len(v) for v in vectors}
    if [row["index"] for row in rows] != list(range(len(texts))) or len(sizes) != 1 or 0 in sizes or \
            not all(map(math.isfinite, (x for v in vectors for x in v))):
        raise JudgeError(f"{url}: the reply is not one finite vector of one size per text ({len(texts)} asked; "
                         f"indices {[row['index'] for row in rows][:10]}, sizes {sorted(sizes)[:5]})")
    return vectors


def _retry_after(value) -> float | None:
    """Seconds a Retry-After header asks for (a number of seconds; an HTTP date is ignored), at most 60."""
    try:
        return min(max(float(value), 0.0), 60.0) if value is not None else None
    except ValueError:
        return None


def _final_json(text: str, names: tuple) -> Any:
    """`names[k]` of the JSON object that ends the reply (the whole reply, or its last part, ```-fenced or not), else
    None. Only at the end: an object quoted earlier (the sample's own `{"result": 10}`) is not the verdict."""
    body = text.strip()
    body = body[:-3].rstrip() if body.endswith("```") else body
    if not body.endswith("}"):
        return None
    decoder, i = json.JSONDecoder(), body.find("{")
    for _ in range(10_000):  # left to right, skipping over each object decoded: the outermost one that ends the reply
        if i < 0:  # (the last 64 starts only, from the right, missed a verdict with braces in its steps; review E)
            break
        try:
            obj, end = decoder.raw_decode(body, i)
        except (ValueError, RecursionError):
            i = body.find("{", i + 1)
            continue
        if end == len(body):
            return next((obj[n] for n in names if n in obj), None) if isinstance(obj, dict) else None
        i = body.find("{", end)
    return None


def parse_score(text: str) -> float | None:
    """The score a judge's reply states (see the module doc), or None."""
    value = _final_json(text, ("result", "score"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer
            return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    if len(last) > _LINE_MAX:
        return None
    found = _BARE.fullmatch(last.strip("*`\"' ").rstrip(".")) or _SCORE_LINE.fullmatch(last)
    return float(found.group(1)) if found else None


def _norm(text: str) -> str:
    return text.strip().strip("*`\"' ").rstrip(".!").strip().casefold()


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a judge's reply states (see the module doc), or None."""
    by_norm = {_norm(label): label for label in labels}
    value = _final_json(text, ("result", "label"))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for candidate in ([value] if isinstance(value, str) else []) + [text] + lines[-1:]:
        if _norm(candidate) in by_norm:
            return by_norm[_norm(candidate)]
    return None


@dataclasses.dataclass(frozen=True)
class ModelGrader:
    """A `score_model` or `label_model` grader (built from its config by `build_grader`)."""

    kind: str
    model: str
    messages: tuple  # ((role, content template), ...)
    base_url: str
    sampling_params: tuple = ()  # sorted (key, value) pairs (hashable)
    range: tuple = (0.0, 1.0)
    labels: tuple = ()
    passing_labels: tuple = ()
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_concurrency: int = 16
    retries: int = 3
    votes_on_answer = False  # a score or a label is no answer to vote on (voting@k is not reported on it)
    endpoint = "judge"  # (check_judges' word for it)

    def validate(self, item: Item) -> None:
        check_item_fields((c for _, c in self.messages), item)

    def request(self, item: Item, text: str) -> dict:
        """The chat-completions request body for one sample."""
        sample = sample_of(text)
        return {"model": self.model, "messages": [{"role": r, "content": render(c, sample, item)}
                                                  for r, c in self.messages], **self.params()}

    def ping(self, key: str | None) -> None:
        """One request with the model and sampling_params: a setting the endpoint refuses (a field it does not take,
        a model it does not serve) failed every row of the run, which went on training on zeros (review); the
        grader's own turns (a template that refuses a system turn refused every row), fields filled with PING."""
        messages = [{"role": r, "content": _TEMPLATE.sub(PING, c)} for r, c in self.messages]
        chat_completion(self.base_url, {"model": self.model, "messages": messages, **self.params()}, api_key=key,
                        timeout=self.timeout, retries=self.retries)

    def params(self) -> dict:
        """`sampling_params` as the chat-completions API spells them: OpenAI's grader field
        `max_completions_tokens` is the API's `max_completion_tokens` (sent as it was, every request got a 400 from
        servers that check their fields; review, session 42)."""
        out = dict(self.sampling_params)
        if "max_completions_tokens" in out:
            out["max_completion_tokens"] = out.pop("max_completions_tokens")
        return out

    def _grade_reply(self, reply: str) -> Grade:
        if self.kind == "label_model":
            label = parse_label(reply, self.labels)
            if label is None:
                return faulted(f"the judge's reply is none of the labels {list(self.labels)}: {reply[:200]!r}")
            return Grade(float(label in self.passing_labels), extracted=label)
        score = parse_score(reply)
        if score is None or not math.isfinite(score):
            return faulted(f"no score in the judge's reply: {reply[:200]!r}")
        low, high = self.range
        return Grade(clip01((score - low) / (high - low), f"score_model {self.model!r} (range {list(self.range)})",
                            ("score_model", self.model, self.messages)), extracted=f"{score:g}")

    def _one(self, item: Item, text: str, key: str | None, down: list) -> Grade:
        try:  # (any failure is this row's: one escaping faulted the whole batch, answered rows too; review E)
            payload = self.request(item, text)
        except SampleFieldMissing as exc:  # the completion lacks what a template reads: unanswered
            return Grade(0.0, error=str(exc.args[0] if exc.args else exc))
        except Exception as exc:  # noqa: BLE001
            return faulted(f"input error: {type(exc).__name__}: {exc}")
        if down:  # the endpoint failed a request of this batch after its retries: the rest fail at once (a hung
            return faulted(f"judge: not asked, the endpoint failed this batch: {down[0]}")  # judge held each row)
        try:
            reply = chat_completion(self.base_url, payload, api_key=key, timeout=self.timeout, retries=self.retries)
        except JudgeError as exc:
            if exc.unreachable:
                down.append(str(exc))
            return faulted(f"judge: {exc}")
        except Exception as exc:  # noqa: BLE001 - this row's fault, not the batch's (the others were answered)
            return faulted(f"judge: {type(exc).__name__}: {exc}")
        try:
            return self._grade_reply(reply)
        except Exception as exc:  # noqa: BLE001
            return faulted(f"the judge's reply could not be read: {type(exc).__name__}: {exc}")

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        _check_lengths(items, texts)
        key, down = os.environ.get(self.api_key_env) or None, []
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, min(self.max_concurrency, len(texts)))) as pool:
                return list(pool.map(lambda a: self._one(a[0], a[1], key, down), zip(items, texts)))
        except Exception as exc:  # noqa: BLE001 - graders never raise into the trainer
            return [faulted(f"grader error: {type(exc).__name__}: {exc}")] * len(texts)


_EMBED_CHUNK = 64  # texts per embeddings request


@dataclasses.dataclass(frozen=True)
class CosineGrader:
    """OpenAI's `text_similarity` grader with `evaluation_metric: "cosine"`: the cosine similarity of the rendered
    `input`'s and `reference`'s embeddings, from an embeddings endpoint (`embeddings`), clipped to [0, 1] (the
    first negative one is logged). Equal texts score 1 and an empty one against another 0 without a request (the API
    refuses empty input). A batch asks for each distinct text once, `_EMBED_CHUNK` texts a request, up to
    `max_concurrency` requests at a time (`_fetch`); a text the endpoint refuses faults its rows, an endpoint that
    cannot be reached every row it had not answered (the rest of the batch is not asked), as a judge's does."""

    input: str
    reference: str
    base_url: str
    model: str = DEFAULT_EMBEDDING_MODEL
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_concurrency: int = 16
    retries: int = 3
    evaluation_metric = "cosine"
    endpoint = "embedding"  # (check_judges' word for it)

    def validate(self, item: Item) -> None:
        _Templated(self.input, self.reference).validate(item)

    def ping(self, key: str | None) -> None:
        embeddings(self.base_url, self.model, [PING], api_key=key, timeout=self.timeout, retries=self.retries)

    def _fetch(self, chunk: list, key: str | None, down: list) -> list:
        """Per text of `chunk`: its vector, or the JudgeError that kept it from one. A chunk the endpoint refuses
        (HTTP 400 for one text past the model's input limit, say) is asked again a text at a time, so that the
        others' rows are scored; an endpoint that cannot be reached fails the chunk and the batch's later ones."""
        if down:
            return [JudgeError(f"not asked, the endpoint failed this batch: {down[0]}")] * len(chunk)
        try:
            return embeddings(self.base_url, self.model, chunk, api_key=key, timeout=self.timeout,
                              retries=self.retries)
        except JudgeError as exc:
            if exc.unreachable:
                down.append(str(exc))
            if exc.unreachable or len(chunk) == 1:
                return [exc] * len(chunk)
        except Exception as exc:  # noqa: BLE001 - this request's rows' fault, not the batch's
            return [JudgeError(f"{type(exc).__name__}: {exc}")] * len(chunk)
        return [r for text in chunk for r in self._fetch([text], key, down)]

    def _score(self, u: list, v: list, text: str) -> Grade:
        if len(u) != len(v):  # (two requests' replies: an endpoint behind a balancer serving two models)
            return faulted(f"embedding: vectors of {len(u)} and {len(v)} numbers (no cosine)")
        dot, nu, nv = (math.fsum(a * b for a, b in zip(x, y)) for x, y in ((u, v), (u, u), (v, v)))
        if nu == 0 or nv == 0:
            return faulted("embedding: the endpoint returned a zero vector (no cosine)")
        cos = min(dot / math.sqrt(nu * nv), 1.0)  # (rounding past 1 is no clip to report)
        return Grade(clip01(cos, f"cosine similarity ({self.model!r})", ("cosine", self.model)), extracted=text[:200])

    def grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        _check_lengths(items, texts)
        try:
            return self._grade_batch(items, texts)
        except Exception as exc:  # noqa: BLE001 - graders never raise into the trainer
            return [faulted(f"grader error: {type(exc).__name__}: {exc}")] * len(texts)

    def _grade_batch(self, items: Sequence[Item], texts: Sequence[str]) -> list[Grade]:
        out: list = [None] * len(texts)
        pairs = []
        for i, (item, text) in enumerate(zip(items, texts)):
            try:
                a, b = _Templated(self.input, self.reference).pair(item, text)
            except SampleFieldMissing as exc:  # the completion lacks what a template reads: unanswered
                out[i] = Grade(0.0, error=str(exc.args[0] if exc.args else exc))
                continue
            except Exception as exc:  # noqa: BLE001
                out[i] = faulted(f"input error: {type(exc).__name__}: {exc}")
                continue
            if a == b or not a or not b:
                out[i] = Grade(float(a == b), extracted=a[:200])
            else:
                pairs.append((i, a, b))
        unique = list(dict.fromkeys(t for _, a, b in pairs for t in (a, b)))
        chunks = [unique[k:k + _EMBED_CHUNK] for k in range(0, len(unique), _EMBED_CHUNK)]
        if chunks:
            key, down = os.environ.get(self.api_key_env) or None, []
            with concurrent.futures.ThreadPoolExecutor(max(1, min(self.max_concurrency, len(chunks)))) as pool:
                replies = list(pool.map(lambda c: self._fetch(c, key, down), chunks))
            got = {t: r for c, reply in zip(chunks, replies) for t, r in zip(c, reply)}
            for i, a, b in pairs:
                failed = next((got[t] for t in (a, b) if isinstance(got[t], Exception)), None)
                out[i] = faulted(f"embedding: {failed}") if failed else self._score(got[a], got[b], a)
        return out


def _number(cfg: Mapping, key: str, where: str, default, low=0.0, high=1e6, integer=False):
    value = cfg.get(key, default)
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and low <= value <= high
    if not ok:
        raise ConfigError(f"{where}.{key}: must be {'an integer' if integer else 'a number'} in [{low:g}, {high:g}], "
                          f"got {value!r}")
    return value


def build_model_grader(cfg: Mapping, where: str) -> ModelGrader:
    """A ModelGrader from its config (`type` score_model / label_model), every field checked, naming its path."""
    cfg = {k: v for k, v in cfg.items() if v is not None}  # (OpenAI's schema: null is "not set"; SDK dumps write it)
    kind = cfg["type"]
    required = ("model", "input") + (("labels", "passing_labels") if kind == "label_model" else ())
    optional = {"name", "sampling_params", "type", *ENDPOINT_KEYS} | \
        ({"range", "pass_threshold"} if kind == "score_model" else set())
    _refuse_key(cfg, where)
    if missing := [k for k in required if k not in cfg]:
        raise ConfigError(f"{where}: missing {missing} for type {kind!r}")
    if unknown := sorted(set(cfg) - set(required) - optional):
        raise ConfigError(f"{where}: unknown keys {unknown} for type {kind!r}")
    _check_names(cfg, where)
    messages = cfg["input"]
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not (isinstance(messages, list) and messages):
        raise ConfigError(f"{where}.input: must be a non-empty list of messages {{\"role\": ..., \"content\": ...}}")
    pairs = []
    for i, m in enumerate(messages):
        at = f"{where}.input[{i}]"
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m) or set(m) - {"role", "content", "type"}:
            raise ConfigError(f"{at}: must be {{\"role\": ..., \"content\": \"template\"}}, got {m!r}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{at}.role: must be one of {list(ROLES)}, got {m['role']!r}")
        content = m["content"]
        if isinstance(content, list) and content and all(
                isinstance(b, Mapping) and b.get("type") in ("input_text", "text") and isinstance(b.get("text"), str)
                for b in content):  # OpenAI's content blocks of text, joined
            content = "".join(b["text"] for b in content)
        if not isinstance(content, str):
            raise ConfigError(f"{at}.content: must be a template string, or a list of {{\"type\": \"input_text\", "
                              f"\"text\": ...}} blocks (images are not supported), got {m['content']!r}")
        try:
            check_template(content)
        except KeyError as exc:
            raise ConfigError(f"{at}.content: {exc.args[0]}") from None
        pairs.append((m["role"], content))
    if not any(path.startswith("sample.") for _, c in pairs for path in _TEMPLATE.findall(c)):
        raise ConfigError(f"{where}.input: no message shows the judge the sample ({{{{sample.output_text}}}})")
    params = cfg.get("sampling_params", {})
    if not isinstance(params, Mapping) or any(k in ("model", "messages", "stream", "n") for k in params):
        raise ConfigError(f"{where}.sampling_params: must be an object of request fields other than model, "
                          f"messages, stream and n, got {params!r}")
    if "max_completions_tokens" in params and "max_completion_tokens" in params:
        raise ConfigError(f"{where}.sampling_params: max_completions_tokens (OpenAI's grader spelling) and "
                          f"max_completion_tokens (the API's) are the same setting: give one")
    extra: dict = {}
    if kind == "score_model":
        r = cfg.get("range", [0, 1])
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) and
                                                                      not isinstance(v, bool) and math.isfinite(v)
                                                                      for v in r) and r[0] < r[1]):
            raise ConfigError(f"{where}.range: must be [low, high] with low < high, got {r!r}")
        if "pass_threshold" in cfg and cfg["pass_threshold"] != r[1]:
            raise ConfigError(f"{where}.pass_threshold: {cfg['pass_threshold']!r} is not supported: this version "
                              f"counts the top of the range ({r[1]!r}) as correct and rewards the score itself; "
                              f"remove it")
        extra["range"] = (float(r[0]), float(r[1]))
    else:
        labels, passing = cfg["labels"], cfg["passing_labels"]
        for k, v in (("labels", labels), ("passing_labels", passing)):
            if not (isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v)):
                raise ConfigError(f"{where}.{k}: must be a non-empty list of strings, got {v!r}")
        if len({_norm(s) for s in labels}) != len(labels):
            raise ConfigError(f"{where}.labels: two labels are the same ignoring case: {labels!r}")
        if stray := [s for s in passing if s not in labels]:
            raise ConfigError(f"{where}.passing_labels: {stray} are not in labels {labels!r}")
        extra.update(labels=tuple(labels), passing_labels=tuple(passing))
    return ModelGrader(kind=kind, model=cfg["model"], messages=tuple(pairs),
                       sampling_params=tuple(sorted(params.items(), key=lambda kv: kv[0])),
                       **_endpoint_settings(cfg, where), **extra)


def _refuse_key(cfg: Mapping, where: str) -> None:
    if "api_key" in cfg:
        raise ConfigError(f"{where}.api_key: a key does not belong in the config (a run writes it to config.json): "
                          f"put it in an environment variable and name that in api_key_env (default "
                          f"OPENAI_API_KEY)")


def _check_names(cfg: Mapping, where: str) -> None:
    for k in ("model", "name", "base_url", "api_key_env"):
        if k in cfg and not (isinstance(cfg[k], str) and cfg[k]):
            raise ConfigError(f"{where}.{k}: must be a non-empty string, got {cfg[k]!r}")


def _endpoint_settings(cfg: Mapping, where: str) -> dict:
    """The endpoint keys (`ENDPOINT_KEYS`) of a model-based grader's config, checked, defaults filled in."""
    return dict(base_url=cfg.get("base_url") or default_base_url(),
                api_key_env=cfg.get("api_key_env", "OPENAI_API_KEY"),
                timeout=float(_number(cfg, "timeout", where, 120.0, low=1e-3, high=86400)),
                max_concurrency=_number(cfg, "max_concurrency", where, 16, low=1, integer=True),
                retries=_number(cfg, "retries", where, 3, integer=True))


def build_cosine_grader(cfg: Mapping, where: str) -> CosineGrader:
    """A CosineGrader from a `text_similarity` config whose metric is `cosine` (its `input` / `reference` templates
    checked by the caller): reftjax's own keys are `model` (the embedding model, default `DEFAULT_EMBEDDING_MODEL`)
    and the endpoint keys of a judge (`ENDPOINT_KEYS`: `base_url` ... `retries`)."""
    cfg = {k: v for k, v in cfg.items() if v is not None}
    _refuse_key(cfg, where)
    _check_names(cfg, where)
    return CosineGrader(input=cfg["input"], reference=cfg["reference"],
                        model=cfg.get("model", DEFAULT_EMBEDDING_MODEL), **_endpoint_settings(cfg, where))


def judges(grader, where: str = "grader"):
    """(config path, grader) of every grader in `grader` that asks an endpoint (a ModelGrader's judge, a
    CosineGrader's embeddings), inside `multi` graders too."""
    subs = getattr(grader, "graders", None)
    if isinstance(subs, Mapping):
        for name, sub in subs.items():
            yield from judges(sub, f"{where}.graders.{name}")
    elif isinstance(grader, (ModelGrader, CosineGrader)):
        yield where, grader


def check_judges(grader, timeout: float = 30.0) -> None:
    """Asks every judge or embedding endpoint of `grader` for its models (`GET {base_url}/models`), then sends it one
    request (`PING`; a judge's with the grader's model, turns and sampling_params), before a run loads anything: an
    endpoint that cannot be reached, refuses the key or refuses the request raises ConfigError naming the config path
    (every reward would be 0, as a grader error); a model the endpoint does not list is logged."""
    for where, g in judges(grader):
        url = g.base_url.rstrip("/") + "/models"
        key = os.environ.get(g.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                listed = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            hint = f" (is ${g.api_key_env} set?)" if exc.code in (401, 403) else ""
            raise ConfigError(f"{where}: the {g.endpoint} endpoint {url} answered HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ConfigError(f"{where}: the {g.endpoint} endpoint {url} cannot be reached: "
                              f"{getattr(exc, 'reason', exc)} (base_url, or $REFTJAX_JUDGE_URL)") from None
        ids = [m.get("id") for m in listed.get("data", []) if isinstance(m, Mapping)] \
            if isinstance(listed, Mapping) else []
        if ids and g.model not in ids:
            log.warning("%s: the %s endpoint %s does not list model %r (it lists %s)", where, g.endpoint, g.base_url,
                        g.model, ids[:10])
        try:
            g.ping(key)
        except JudgeError as exc:
            what = "(model, sampling_params)" if isinstance(g, ModelGrader) else "(model)"
            raise ConfigError(f"{where}: the {g.endpoint} endpoint refuses the grader's request {what}: "
                              f"{exc}") from None
