"""Model-based graders (`score_model`, `label_model`) against a scripted OpenAI-compatible endpoint, and reftjax's
own endpoint (`reftjax.serve`) against `generate`."""
import concurrent.futures
import contextlib
import functools
import http.server
import json
import logging
import os
import threading

import numpy as np
import pytest

from reftjax.graders import ConfigError, build_grader, check_judges
from reftjax.graders.judge import parse_label, parse_score


class _Judge:
    """A scripted chat-completions endpoint in a thread: `reply(body) -> (status, text[, headers])`; records
    requests."""

    def __init__(self, reply, models=("judge",)):
        self.requests, self.headers, self.reply = [], [], reply
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                outer.headers.append(dict(self.headers))
                self._send(200, {"object": "list", "data": [{"id": m} for m in models]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                status, text, *headers = outer.reply(body)  # (a third element: the reply's headers)
                if status != 200:
                    return self._send(status, {"error": {"message": text}}, *headers)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # (shutdown() waits for serve_forever's next poll: 0.5 s by default, in each of ~20 tests' teardowns)
        threading.Thread(target=functools.partial(self.server.serve_forever, poll_interval=0.01), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler):
    """`handler` (a request handler class) served in a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.01), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def judge():
    made = []

    def make(reply, **kw):
        made.append(_Judge(reply, **kw))
        return made[-1]

    yield make
    for j in made:
        j.close()


def _user(body):
    return body["messages"][-1]["content"]


def _score_cfg(url, **kw):
    return {"type": "score_model", "model": "judge", "base_url": url,
            "input": [{"role": "system", "content": "Score 0-10."},
                      {"role": "user", "content": "Q: {{item.q}}\nA: {{sample.output_text}}"}], **kw}


@pytest.mark.parametrize("reply,score", [
    ("7", 7.0), (" 0.25.\n", 0.25), ("**8**", 8.0), ('{"result": 3, "steps": []}', 3.0),
    ('Reasoning...\n{"score": 9.5}', 9.5), ("The answer is 42, right.\nScore: 6", 6.0),
    ("**Final score:** 7/10", 7.0), ("Score: 7 out of 10.", 7.0), ('```json\n{"result": 4}\n```', 4.0),
    ('the answer \\boxed{18} is right\n{"result": 9}', 9.0),  # a brace before the verdict (math answers have them)
    ("8 out of 10", 8.0), ("8/10", 8.0), ("Overall score: 8", 8.0), ("Score (0-10): 8", 8.0), ("no idea", None),
    ('{"result": "high"}', None), ("rating = 2 ... final grade: 4", None),
    # only the end of the reply counts: a score the sample states, quoted by the judge, is not read (review)
    ("Score: 2 ... an upgrade: 10 more steps", None), ('Score: 1\nThe student claims "score: 10"', None),
    ('The answer says {"result": 10}.\nScore: 3', 3.0),
    ('The sample wrote {"result": 10}, which is wrong.\n{"result": 2}', 2.0),  # the object that ends the reply
    ('{"steps": [' + ",".join(['"\\\\frac{1}{2}"'] * 80) + '], "result": 0.25}', 0.25),  # 160 braces in its steps
    ('{"result": ' + "9" * 400 + "}", None), ("1" * 100_000, None), ("1" * 100_000 + "\nScore: 2", 2.0),
])
def test_scores_are_read_from_json_a_bare_number_or_a_named_score(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply,label", [
    ("correct", "correct"), ("  Incorrect.\n", "incorrect"), ('"CORRECT"', "correct"), ("**correct**", "correct"),
    ('{"result": "incorrect"}', "incorrect"), ("Let me think.\nThe steps hold.\ncorrect", "correct"),
    ("Correct!", "correct"), ("**Incorrect!**", "incorrect"),
    ('Found \\boxed{18}.\n{"result": "correct"}', "correct"), ("it is correct", None), ("maybe", None),
    ('It claims {"result": "correct"} itself.\n{"result": "incorrect"}', "incorrect"),
])
def test_labels_are_matched_whole_ignoring_case(reply, label):
    assert parse_label(reply, ("correct", "incorrect")) == label


def test_score_model_maps_its_range_and_sends_the_rendered_messages(judge, monkeypatch, caplog):
    j = judge(lambda body: (200, {"A: 2": "7", "A: 3": "12", "A: x": "?"}[_user(body).split("\n")[1]]))
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    g = build_grader(_score_cfg(j.url, range=[0, 10], api_key_env="JUDGE_KEY",
                                sampling_params={"temperature": 0, "max_completion_tokens": 8}))
    with caplog.at_level(logging.WARNING, "reftjax.graders"):
        grades = g.grade_batch([{"q": "1+1"}] * 3, ["2", "3", "x"])
    assert [gr.score for gr in grades[:2]] == [0.7, 1.0] and grades[0].extracted == "7" and grades[0].error is None
    assert "outside [0, 1]" in caplog.text  # 12 of [0, 10]: clipped, said once
    assert grades[2].score == 0 and grades[2].details.get("grader_fault") and "no score" in grades[2].error
    body = sorted(j.requests, key=_user)[0]
    assert body == {"model": "judge", "temperature": 0, "max_completion_tokens": 8,
                    "messages": [{"role": "system", "content": "Score 0-10."},
                                 {"role": "user", "content": "Q: 1+1\nA: 2"}]}
    assert all(h.get("Authorization") == "Bearer sk-test" for h in j.headers)
    assert g.votes_on_answer is False  # a score is no answer to vote on


def test_a_range_that_does_not_start_at_0_maps_onto_0_1(judge):
    """Every test's range started at 0, where `score / high` and `(score - low) / (high - low)` agree: a 1-5
    rubric's 3 must score 0.5, not 0.4 (mutation review, session 44)."""
    j = judge(lambda body: (200, _user(body).split("A: ")[1]))
    g = build_grader(_score_cfg(j.url, range=[1, 5]))
    assert [gr.score for gr in g.grade_batch([{"q": "q"}] * 3, ["1", "3", "5"])] == [0.0, 0.5, 1.0]


def test_retries_wait_as_documented(judge, monkeypatch):
    """Retries wait `backoff` seconds, doubling up to 30 s, or what a Retry-After header asks, at most a minute;
    `retries` is 3 unless set. None of it was tested: a judge hammered without a wait, a `Retry-After: 3600` holding
    every row for an hour or a default of no retries would have passed (mutation review, session 44)."""
    from reftjax.graders import judge as J

    assert [J._retry_after(v) for v in ("3600", "-5", "0.2", None, "Wed, 21 Oct 2026 07:28:00 GMT")] == \
        [60.0, 0.0, 0.2, None, None]
    slept = []
    monkeypatch.setattr(J, "time", type("T", (), {"sleep": staticmethod(slept.append)}))
    calls = {"n": 0}

    def reply(body):  # 503 twice (the second asking for 0.05 s), then 200, for each request
        calls["n"] += 1
        return {1: (503, "busy"), 2: (503, "busy", {"Retry-After": "0.05"})}.get(calls["n"] % 3, (200, "4"))

    j = judge(reply)
    g = build_grader(_score_cfg(j.url, range=[0, 10]))
    assert g.retries == 3
    assert g.grade_batch([{"q": "q"}], ["x"])[0].score == 0.4 and slept == [0.5, 0.05]
    slept.clear()
    assert J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=3, backoff=20) == "4"
    assert slept == [20, 0.05]
    calls["n"], slept[:] = 1, []  # every request busy: 20, 30, 30 s and the error
    j.reply = lambda body: (503, "busy")
    with pytest.raises(J.JudgeError, match="HTTP 503"):
        J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=3, backoff=20)
    assert slept == [20, 30.0, 30.0]


def test_label_model_passes_on_its_passing_labels(judge):
    j = judge(lambda body: (200, {"ok": "Correct", "bad": "incorrect", "odd": "unsure"}[_user(body)[-3:].strip()]))
    g = build_grader({"type": "label_model", "model": "judge", "base_url": j.url,
                      "input": [{"role": "user", "content": "Grade: {{sample.output_text}}"}],
                      "labels": ["correct", "incorrect"], "passing_labels": ["correct"]})
    grades = g.grade_batch([{}] * 3, ["ok", "bad", "odd"])
    assert [(gr.score, gr.extracted) for gr in grades[:2]] == [(1.0, "correct"), (0.0, "incorrect")]
    assert grades[2].details.get("grader_fault") and "none of the labels" in grades[2].error


def test_busy_endpoints_are_retried_and_errors_are_grader_faults_in_order(judge):
    calls = {"n": 0}

    def reply(body):
        calls["n"] += 1
        text = _user(body).split("A: ")[1]
        if text == "busy" and calls["n"] <= 2:
            return 503, "overloaded"
        return (400, "bad request: no such model") if text == "refused" else (200, "score: 1")

    j = judge(reply)
    g = build_grader(_score_cfg(j.url, retries=2, max_concurrency=1))
    grades = g.grade_batch([{"q": "q"}] * 3, ["busy", "refused", "fine"])
    assert grades[0].score == 1.0 and grades[2].score == 1.0  # the 503s retried
    assert grades[1].details.get("grader_fault") and "HTTP 400: " in grades[1].error
    assert "no such model" in grades[1].error
    assert calls["n"] == 5  # 503, 503, 200 for the first; one 400 (not retried); one 200
    dead = build_grader(_score_cfg("http://127.0.0.1:9/v1", retries=0, timeout=5, max_concurrency=1))
    first, *rest = dead.grade_batch([{"q": "q"}] * 3, ["a", "b", "c"])
    assert first.details.get("grader_fault") and "judge: http://127.0.0.1:9/v1/chat/completions: " in first.error
    # the rest of the batch is not sent to an endpoint that failed it (a hung judge held every row for its timeout)
    assert all(gr.details.get("grader_fault") and "not asked, the endpoint failed this batch" in gr.error
               for gr in rest)


def test_a_sample_without_what_a_template_reads_is_unanswered_not_a_fault(judge):
    j = judge(lambda body: (200, "1"))
    g = build_grader({"type": "score_model", "model": "judge", "base_url": j.url,
                      "input": [{"role": "user", "content": "{{sample.output_json.answer}}"}]})
    bad, good = g.grade_batch([{}, {}], ["not json", '{"answer": 4}'])
    assert bad.score == 0 and bad.error and not bad.details.get("grader_fault") and good.score == 1.0
    assert j.requests == [{"model": "judge", "messages": [{"role": "user", "content": "4"}]}]


def test_a_judge_inside_a_multi_grader(judge):
    j = judge(lambda body: (200, "0.5"))
    g = build_grader({"type": "multi", "calculate_output": "0.5 * judge + 0.5 * exact", "graders": {
        "judge": _score_cfg(j.url),
        "exact": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
                  "operation": "eq"}}})
    grades = g.grade_batch([{"q": "q", "a": "4"}] * 2, ["4", "5"])
    assert [gr.score for gr in grades] == [0.75, 0.25] and grades[0].details["scores"] == {"judge": 0.5, "exact": 1.0}


def test_check_judges_fails_before_a_run_on_an_unreachable_or_refusing_endpoint(judge, caplog):
    j = judge(lambda body: (200, "1"), models=("other",))
    with caplog.at_level(logging.WARNING, "reftjax.graders"):
        check_judges(build_grader(_score_cfg(j.url)))
    assert "does not list model 'judge'" in caplog.text
    multi = {"type": "multi", "calculate_output": "a", "graders": {"a": _score_cfg("http://127.0.0.1:9/v1")}}
    with pytest.raises(ConfigError, match=r"grader\.graders\.a: the judge endpoint http://127.0.0.1:9/v1/models "
                                          r"cannot be reached"):
        check_judges(build_grader(multi))

    class Refuse(_Quiet):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _serving(Refuse) as url, pytest.raises(ConfigError, match=r"HTTP 401 \(is \$OPENAI_API_KEY set\?\)"):
        check_judges(build_grader(_score_cfg(url)))


@pytest.mark.parametrize("change,message", [
    ({"api_key": "sk-1"}, r"grader\.api_key: a key does not belong in the config"),
    ({"input": [{"role": "judge", "content": "{{sample.output_text}}"}]}, r"grader\.input\[0\]\.role"),
    ({"input": [{"role": "user", "content": "Rate {{item.q}}"}]}, r"no message shows the judge the sample"),
    ({"input": [{"role": "user", "content": "{{sample.text}}"}]}, r"grader\.input\[0\]\.content: template field"),
    ({"input": []}, r"grader\.input: must be a non-empty list"),
    ({"range": [10, 0]}, r"grader\.range: must be \[low, high\]"),
    ({"pass_threshold": 0.5}, r"grader\.pass_threshold: 0\.5 is not supported"),
    ({"sampling_params": {"n": 4}}, r"grader\.sampling_params"),
    ({"timeout": 0}, r"grader\.timeout: must be a number"),
    ({"max_concurrency": 2.5}, r"grader\.max_concurrency: must be an integer"),
    ({"max_concurrency": 0}, r"grader\.max_concurrency: must be an integer in \[1, "),
    ({"labels": ["a"]}, r"unknown keys \['labels'\]"),
    ({"model": ""}, r"grader\.model: must be a non-empty string"),
])
def test_score_model_configs_are_checked_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        build_grader({**_score_cfg("http://127.0.0.1:9/v1"), **change})


@pytest.mark.parametrize("change,message", [
    ({"labels": ["yes", "YES"]}, r"the same ignoring case"),
    ({"passing_labels": ["maybe"]}, r"passing_labels: \['maybe'\] are not in labels"),
    ({"labels": []}, r"grader\.labels: must be a non-empty list"),
    ({"range": [0, 1]}, r"unknown keys \['range'\]"),
])
def test_label_model_configs_are_checked_naming_the_field(change, message):
    cfg = {"type": "label_model", "model": "m", "input": "{{sample.output_text}}", "labels": ["yes", "no"],
           "passing_labels": ["yes"]}
    with pytest.raises(ConfigError, match=message):
        build_grader({**cfg, **change})


def test_the_endpoint_defaults_to_the_environment(monkeypatch):
    cfg = {k: v for k, v in _score_cfg("x").items() if k != "base_url"}
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("REFTJAX_JUDGE_URL", raising=False)
    assert build_grader(cfg).base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://a/v1")
    assert build_grader(cfg).base_url == "http://a/v1"
    monkeypatch.setenv("REFTJAX_JUDGE_URL", "http://b/v1")
    assert build_grader(cfg).base_url == "http://b/v1"


# -- reftjax's own endpoint ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_hf_dir):
    from reftjax.hf import load_model
    from reftjax.serve import ServeConfig, start_server

    model = load_model(tiny_hf_dir)
    server = start_server(model.params, model.config, model.tokenizer,
                          ServeConfig(batch_size=4, max_new_tokens=12, prompt_buckets=(64, 128)), name="tiny", port=0)
    yield model, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_the_server_answers_as_generate_does_in_batches(served):
    from reftjax.graders.judge import chat_completion
    from reftjax.rollout import SamplingConfig, generate

    model, url = served
    texts = [f"What is {i} + {i}?" for i in range(6)]
    want = generate(model.params, model.config, model.tokenizer, texts, batch_size=4,
                    cfg=SamplingConfig(max_new_tokens=12, greedy=True))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # 6 requests at once: more than one batch of 4
        got = list(pool.map(lambda t: chat_completion(url, {"model": "tiny", "temperature": 0, "messages": [
            {"role": "user", "content": t}]}), texts))
    assert got == want and any(got)
    short = chat_completion(url, {"model": "tiny", "temperature": 0, "max_tokens": 3,
                                  "messages": [{"role": "user", "content": texts[0]}]})
    assert want[0].startswith(short) and len(model.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 3


def test_the_server_samples_with_the_request_s_top_p(served):
    """`top_p` reached neither the sampler nor the batch key in a mutant that passed the suite (mutation review,
    session 44): a nucleus of one token is greedy decoding, while temperature 1 alone samples other replies."""
    from reftjax.graders.judge import chat_completion
    from reftjax.serve import Engine, Request

    model, url = served
    ask = lambda **kw: chat_completion(url, {"model": "tiny", "messages": [  # noqa: E731
        {"role": "user", "content": "What is 2 + 2?"}], **kw})
    greedy = ask(temperature=0)
    assert [ask(temperature=1.0, top_p=1e-9, seed=s) for s in range(3)] == [greedy] * 3
    assert any(ask(temperature=1.0, seed=s) != greedy for s in range(3))
    req = lambda top_p: Request((1, 2), 4, 1.0, top_p, None)  # noqa: E731
    assert Engine.key(req(0.5)) != Engine.key(req(1.0))


def test_a_reply_whose_eos_is_its_last_allowed_token_stopped(served, monkeypatch):
    """A reply ending on its EOS at exactly `max_tokens` stopped ("stop"); one cut before its EOS is "length"
    (a mutant reporting the first as "length" passed the suite; mutation review, session 44). The decoder is
    scripted: every row's EOS at slot 4."""
    import types

    from reftjax import rollout as R
    from reftjax.serve import Engine, Request, ServeConfig

    model, _ = served
    engine = Engine(model.params, model.config, model.tokenizer, ServeConfig(batch_size=3, max_new_tokens=12,
                                                                             prompt_buckets=(16,)))
    eos = engine.eos[0]
    ids = np.array([[5, 6, 7, eos] + [engine.pad] * 8] * 3, np.int32)
    monkeypatch.setattr(R, "rollout", lambda *a, **k: types.SimpleNamespace(
        tokens_BxN=ids, lengths_B=np.full(3, 4), finished_B=np.ones(3, bool)))
    got = engine.run([Request((1, 2), m, 0.0, 1.0, None) for m in (12, 4, 3)])
    assert [(g["finish_reason"], g["completion_tokens"]) for g in got] == [("stop", 4), ("stop", 4), ("length", 3)]
    text = model.tokenizer.decode([5, 6, 7], skip_special_tokens=True)
    assert got[0]["text"] == got[1]["text"] == text


def test_the_server_embeds_as_transformers_mean_pools_its_last_hidden_state(served, tiny_hf_dir):
    """`POST /v1/embeddings` (session 60): each text's vector is the unit-length mean of transformers' (torch's)
    `last_hidden_state` over its tokens, whatever its batch-mates (7 texts: calls of 4 rows and 3, buckets 128 and
    64); the reply is OpenAI's (indices, usage); a cosine grader asks it after the connection check."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModel

    from reftjax.graders.judge import _post_json, embeddings

    model, url = served
    texts = ["What is 2 + 2?", "a", "The cat sat on the mat. " * 12, "x y z", "Paris", "4", "Hello there"]
    got = np.array(embeddings(url, "tiny", texts))
    ref = AutoModel.from_pretrained(tiny_hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        states = [ref(input_ids=torch.tensor([model.tokenizer(t)["input_ids"]])).last_hidden_state[0].mean(0)
                  for t in texts]
    want = np.array([(h / h.norm()).numpy() for h in states])
    assert got.shape == (7, 32) and np.abs(got - want).max() < 1e-5
    alone = _post_json(url + "/embeddings", {"input": texts[4]}, api_key=None, timeout=60, retries=0, backoff=0)
    np.testing.assert_allclose(alone["data"][0]["embedding"], got[4], atol=1e-6)  # one text, as a string
    reply = _post_json(url + "/embeddings", {"model": "x", "input": texts[:2], "encoding_format": "float", "user": "u"},
                       api_key=None, timeout=60, retries=0, backoff=0)
    n = sum(len(model.tokenizer(t)["input_ids"]) for t in texts[:2])
    assert (reply["object"], reply["model"]) == ("list", "tiny")
    assert reply["usage"] == {"prompt_tokens": n, "total_tokens": n}
    assert [(r["object"], r["index"]) for r in reply["data"]] == [("embedding", 0), ("embedding", 1)]
    cosine = build_grader({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
                           "evaluation_metric": "cosine", "model": "tiny", "base_url": url})
    check_judges(cosine)
    grades = cosine.grade_batch([{"a": texts[0]}] * 2, [texts[1], texts[0]])
    assert [g.score for g in grades] == pytest.approx([max(0.0, float(got[1] @ got[0])), 1.0], abs=1e-6)


def test_the_server_refuses_embeddings_it_cannot_make(served):
    from reftjax.graders.judge import JudgeError, _post_json

    _, url = served
    for body, message in [({"input": ""}, "input: must be a non-empty text"), ({"input": [[1, 2]]}, "token ids"),
                          ({"input": []}, "input: must be"), ({"input": ["a", ""]}, "input: must be"),
                          ({"input": "a", "encoding_format": "base64"}, "encoding_format: 'base64' is not supported"),
                          ({"input": "a", "dimensions": 8}, "dimensions: not supported"),
                          ({"input": "a", "stream": True}, r"unknown fields \['stream'\]"),
                          ({"input": ["a", "hi " * 200]}, r"input\[1\]: 2\d\d tokens, not 1..128"),
                          ({"input": ["a"] * 2049}, "input: 2049 texts, over 2048"),
                          (["a"], "the body must be a JSON object")]:
        with pytest.raises(JudgeError, match=f"HTTP 400: .*{message}"):
            _post_json(url + "/embeddings", body, api_key=None, timeout=60, retries=0, backoff=0)


def test_the_server_refuses_what_it_cannot_serve(served):
    from reftjax.graders.judge import JudgeError, chat_completion

    _, url = served
    msg = [{"role": "user", "content": "hi"}]
    for extra, message in [({"stop": ["\n"]}, r"\['stop'\] are not supported"), ({"n": 2}, "only n=1"),
                           ({"temperature": 3}, "temperature: 3 is out of range"),
                           ({"max_tokens": 13}, r"out of range \(this server's --max-new-tokens is 12\)"),
                           ({"frobnicate": 1}, r"unknown fields \['frobnicate'\]")]:
        with pytest.raises(JudgeError, match=f"HTTP 400: .*{message}"):
            chat_completion(url, {"model": "tiny", "messages": msg, **extra}, retries=0)
    with pytest.raises(JudgeError, match="over the longest prompt bucket 128"):
        chat_completion(url, {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 200}]}, retries=0)
    check_judges(build_grader(_score_cfg(url) | {"model": "tiny"}))  # it lists its name


@pytest.mark.heavy
def test_a_run_trains_and_selects_on_a_judge_s_scores(tiny_hf_dir, tmp_path, shared_data, judge):
    """The whole command with a score_model grader: the RL rewards, the logged rollouts and the validation figures
    are the judge's replies (a rule on the completion's length), read through the grader callback in the jitted
    rollout."""
    import pathlib
    import subprocess
    import sys

    def rule(text):  # scores 0..9 of range [0, 9]
        return len(text) % 10

    def reply(body):  # (check_judges' PING first)
        text = _user(body)
        return 200, f"score: {rule(text.split('A: ', 1)[1])}" if "A: " in text else "OK"

    j = judge(reply)
    root = pathlib.Path(__file__).resolve().parents[1]
    grader = _score_cfg(j.url, range=[0, 9])
    grader["input"][1]["content"] = "Q: {{item.question}}\nA: {{sample.output_text}}"
    sets = {"data.n_train": 8, "data.n_val": 4, "data.n_test": 4, "sft.epochs": 0, "rl.iterations": 1,
            "rl.prompts_per_iteration": 4, "rl.sampling.max_new_tokens": 12, "eval.max_new_tokens": 12,
            "eval.batch_size": 4, "rl.eval_every": 1, "export_hf": False, "eval_before_sft": False,
            "grader": grader}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.gsm8k_reft", "--model", str(tiny_hf_dir), "--out", str(out),
           "--no-progress", *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    env = {**os.environ, "XLA_FLAGS": os.environ["REFTJAX_TEST_SPEED_XLA_FLAGS"]}  # no device count: as a user runs
    done = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    [rl] = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "rl"]
    rows = [json.loads(line) for line in (out / "samples" / "rl_rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == rl["graded"] > 0 and rl["grader_errors"] == 0
    assert [r["score"] for r in rows] == [rule(r["completion"]) / 9 for r in rows]
    assert rl["reward"] == pytest.approx(sum(r["score"] for r in rows) / len(rows))
    judged = {_user(b).split("A: ", 1)[1] for b in j.requests[1:]}
    assert "connection check" in _user(j.requests[0])  # check_judges' one request, before the model loaded
    assert {r["completion"] for r in rows} <= judged
    # validation and test went through the judge too; a partial-credit grader selects on the mean score
    summary = json.loads((out / "summary.json").read_text())
    assert len(j.requests) >= len(rows) + 4 + 4 and summary["selection_metric"] == "mean_score"
    val = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["phase"] == "val"]
    assert val and 0 <= val[0]["mean_score"] <= 1 and val[0]["grader_errors"] == 0


def test_readme_s_judge_example_is_a_grader_this_version_builds():
    import pathlib
    import re

    from reftjax.config import ExperimentConfig
    from reftjax.serve import build_parser

    root = pathlib.Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme[readme.index("## Model-based graders"):]
    serve, run = re.search(r"```bash\n(.*?)```", block, re.S).group(1).strip().splitlines()
    assert run.startswith("python -m experiments.gsm8k_reft --set grader=\"$(cat experiments/graders/")
    cfg = json.loads((root / run.split("$(cat ")[1].split(")")[0]).read_text())
    g = build_grader(cfg)
    assert g.kind == "label_model" and g.model in serve and g.base_url == "http://127.0.0.1:8000/v1"  # serve's port
    ExperimentConfig(grader=tuple(cfg.items()))  # what --set grader=... makes of it
    flags = re.findall(r"(--[a-z-]+)", serve.split("#")[0])
    args = build_parser().parse_args(serve.split("&")[0].split()[3:])  # the server takes every flag shown
    assert flags == ["--model", "--name", "--max-new-tokens"] and (args.name, args.max_new_tokens) == ("judge", 8)


def test_openai_s_max_completions_tokens_is_sent_as_the_api_s_field(judge):
    j = judge(lambda body: (200, "1"))
    g = build_grader(_score_cfg(j.url, sampling_params={"max_completions_tokens": 5, "seed": 1}))
    assert g.grade_batch([{"q": "q"}], ["a"])[0].score == 1.0
    assert j.requests[0]["max_completion_tokens"] == 5 and "max_completions_tokens" not in j.requests[0]
    with pytest.raises(ConfigError, match="are the same setting"):
        build_grader(_score_cfg(j.url, sampling_params={"max_completions_tokens": 5, "max_completion_tokens": 5}))


def test_a_reply_cut_mid_body_is_retried_and_faults_its_row_alone(judge):
    """A connection dropped mid-reply (http.client.IncompleteRead) escaped the retries and replaced every grade of
    the batch, the answered rows' too (review, session 42)."""
    cuts = {"n": 0}

    class Cut(_Quiet):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = _user(body).split("A: ")[1]
            data = json.dumps({"choices": [{"message": {"content": "1"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if text.startswith("cut") and (text == "cut-always" or cuts["n"] == 0):
                cuts["n"] += 1
                self.wfile.write(data[:5])  # then the connection closes
                self.close_connection = True
                return
            self.wfile.write(data)

    with _serving(Cut) as url:
        g = build_grader(_score_cfg(url, retries=1, max_concurrency=1))
        assert [gr.score for gr in g.grade_batch([{"q": "q"}] * 3, ["a", "cut-once", "b"])] == [1.0, 1.0, 1.0]
        a, cut = build_grader(_score_cfg(url, retries=0, max_concurrency=1)).grade_batch([{"q": "q"}] * 2,
                                                                                         ["a", "cut-always"])
        assert a.score == 1.0 and a.error is None  # the answered row keeps its grade
        assert cut.details.get("grader_fault") and "IncompleteRead" in cut.error


def test_check_judges_sends_one_request_with_the_grader_s_settings(judge):
    """GET /models alone passed a grader whose every request the endpoint refuses (a field it does not take):
    the run trained on zeros (review, session 42)."""
    def reply(body):
        return (400, "unknown field top_k") if "top_k" in body else (200, "OK")

    j = judge(reply)
    check_judges(build_grader(_score_cfg(j.url, sampling_params={"temperature": 0})))
    assert j.requests[-1]["temperature"] == 0 and j.requests[-1]["model"] == "judge"
    with pytest.raises(ConfigError, match=r"grader: the judge endpoint refuses the grader's request .*HTTP 400: "
                                          r".*unknown field top_k"):
        check_judges(build_grader(_score_cfg(j.url, sampling_params={"top_k": 5})))


def test_the_server_keeps_a_connection_in_step_and_takes_null_fields(served):
    import http.client

    _, url = served
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    msg = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}

    def post(path, body, headers=None):
        data = json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    assert post("/v1/nowhere", msg)[0] == 404
    status, out = post("/v1/chat/completions", msg)  # the same kept-alive connection: the 404's body was read
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
    nulls = dict(msg, max_tokens=None, n=None, stop=None, logprobs=None, seed=None, top_p=None, stream=False)
    assert post("/v1/chat/completions", nulls)[0] == 200
    status, out = post("/v1/chat/completions", dict(msg, seed=2**64))
    assert status == 400 and "seed" in out["error"]["message"]
    conn.close()
    for bad in ("-1", "x", str(1 << 40)):  # answered, not dropped or held open
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", bad)
        conn.endheaders()
        assert conn.getresponse().status in (400, 413)
        conn.close()
    deep = "[" * 100000 + "]" * 100000
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", deep.encode())
    assert conn.getresponse().status == 400
    conn.close()


def test_a_row_that_cannot_be_read_faults_alone(judge):
    """A sample of 1,000 `[` (its JSON parse recursed) or a 400-digit verdict raised out of one row and faulted the
    whole batch, answered rows too (review E, session 42)."""
    j = judge(lambda body: (200, '{"result": ' + "9" * 400 + "}" if "big" in _user(body) else "0.5"))
    g = build_grader(_score_cfg(j.url, max_concurrency=1))
    grades = g.grade_batch([{"q": "q"}] * 4, ["a", "[" * 5000, "big", "b"])
    assert [gr.score for gr in grades] == [0.5, 0.5, 0.0, 0.5] and grades[2].details.get("grader_fault")


def test_openai_sdk_style_configs_are_taken(judge):
    """Text content blocks and null optional fields (what an SDK's model_dump() writes) were refused."""
    j = judge(lambda body: (200, "1"))
    cfg = _score_cfg(j.url, sampling_params=None, range=None, pass_threshold=None)
    cfg["input"][1] = {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "Q: {{item.q}} "},
                                   {"type": "input_text", "text": "A: {{sample.output_text}}"}]}
    g = build_grader(cfg)
    assert g.range == (0.0, 1.0) and g.grade_batch([{"q": "1+1"}], ["2"])[0].score == 1.0
    assert _user(j.requests[0]) == "Q: 1+1 A: 2"
    with pytest.raises(ConfigError, match=r"timeout: must be a number in \[0.001, 86400\]"):
        build_grader(_score_cfg(j.url, timeout=1e12))


def test_check_judges_sends_the_grader_s_own_turns(judge):
    """A single user turn passed an endpoint that refuses the grader's system turn (every row then a 400)."""
    j = judge(lambda body: (400, "no system role") if body["messages"][0]["role"] == "system" else (200, "1"))
    with pytest.raises(ConfigError, match="no system role"):
        check_judges(build_grader(_score_cfg(j.url)))
    assert "{{" not in json.dumps(j.requests[0])  # template fields filled


def test_the_server_refuses_a_chunked_body_and_closes(served):
    import http.client

    _, url = served
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()  # (the chunks are not sent: the server answers on the headers)
    resp = conn.getresponse()
    assert resp.status == 411 and resp.getheader("Connection") == "close"
    conn.close()


def test_the_graders_cli_run_asks_the_judge_first_and_validate_stays_offline(tmp_path, capsys):
    """`python -m reftjax.graders run` checks a model-based grader's endpoint before grading (its docstring): an
    unreachable judge is one error line and exit 2, not every sample graded as a grader fault with exit 0; `validate`
    does not ask it. A run without the check passed every test (mutation review, session 45)."""
    from reftjax.graders.__main__ import main

    grader = tmp_path / "g.json"
    grader.write_text(json.dumps(_score_cfg("http://127.0.0.1:9/v1", retries=0)))
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"item": {"q": "2 + 2?"}, "sample": {"output_text": "4"}}) + "\n")
    assert main(["validate", "--grader", str(grader), "--samples", str(samples)]) == 0
    capsys.readouterr()
    assert main(["run", "--grader", str(grader), "--samples", str(samples)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {grader}: ") and "cannot be reached" in err, err


def test_a_rate_limit_is_retried_and_an_infinite_score_is_no_score(judge, monkeypatch):
    """429 (rate limited) is retried as a busy endpoint is, not failed at once; a reply of `1e999` reads as inf,
    which is no score (a grader error), not a score clipped to 1 (mutation review, session 46)."""
    from reftjax.graders import judge as J

    slept = []
    monkeypatch.setattr(J, "time", type("T", (), {"sleep": staticmethod(slept.append)}))
    calls = {"n": 0}

    def reply(body):
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, "rate limited"
        return 200, {"big": "1e999", "neg": "-1e999"}.get(_user(body).split("A: ")[1], "7")

    j = judge(reply)
    g = build_grader(_score_cfg(j.url, range=[0, 10], max_concurrency=1))
    ok, big, neg = g.grade_batch([{"q": "q"}] * 3, ["a", "big", "neg"])
    assert (ok.score, ok.error) == (0.7, None) and slept == [0.5] and calls["n"] == 4
    for grade in (big, neg):
        assert grade.score == 0.0 and grade.details.get("grader_fault") and "no score" in grade.error


def test_a_pass_threshold_at_the_top_of_the_range_is_accepted():
    """score_model's pass_threshold is refused unless it says what this version does (the top of the range counts
    as correct): at the top of a [0, 10] range it is 10, not 1."""
    g = build_grader(_score_cfg("http://127.0.0.1:9/v1", range=[0, 10], pass_threshold=10))
    assert g.range == (0.0, 10.0)
    with pytest.raises(ConfigError, match=r"pass_threshold: 1 is not supported: .*top of the range \(10\)"):
        build_grader(_score_cfg("http://127.0.0.1:9/v1", range=[0, 10], pass_threshold=1))


def test_check_judges_hints_at_the_key_on_a_forbidden_endpoint():
    class Forbid(_Quiet):
        def do_GET(self):  # noqa: N802
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _serving(Forbid) as url, pytest.raises(ConfigError, match=r"HTTP 403 \(is \$JUDGE_KEY set\?\)"):
        check_judges(build_grader(_score_cfg(url, api_key_env="JUDGE_KEY")))


def test_the_server_s_limits_are_inclusive_and_its_fields_read_as_openai_s(smollm_tokenizer):
    """parse_request's bounds (temperature 2 and max_tokens up to --max-new-tokens taken; 0 tokens, top_p 0 and
    booleans refused as 400s, not a 500 from the sampler), `max_completion_tokens` over the deprecated `max_tokens`,
    switched-off fields taken, text parts joined, a developer turn rendered as the system turn (mutation review,
    session 46)."""
    from reftjax.serve import RequestError, ServeConfig, parse_request

    msg = [{"role": "user", "content": "What is 2+2?"}]
    parse = lambda **kw: parse_request({"messages": msg, **kw}, smollm_tokenizer,  # noqa: E731
                                       ServeConfig(max_new_tokens=12), {})
    r = parse(temperature=2, top_p=1, max_tokens=12, seed=-1)
    assert (r.temperature, r.top_p, r.max_tokens, r.seed) == (2.0, 1.0, 12, -1)
    assert parse().max_tokens == 12 and parse(max_completion_tokens=1).max_tokens == 1
    assert parse(max_tokens=3, max_completion_tokens=5).max_tokens == 5
    for bad, name in ((dict(max_tokens=0), "max_completion_tokens"), (dict(max_completion_tokens=13), "max_"),
                      (dict(top_p=0), "top_p"), (dict(temperature=-0.5), "temperature"),
                      (dict(temperature=True), "temperature"), (dict(max_tokens=True), "max_"),
                      (dict(seed=True), "seed"), (dict(top_p="1"), "top_p")):
        with pytest.raises(RequestError, match=f"{name}.* is out of range"):
            parse(**bad)
    assert parse(logprobs=False, tools=[], response_format={}).max_tokens == 12  # set to "off": nothing asked
    with pytest.raises(RequestError, match=r"\['logprobs'\] are not supported"):
        parse(logprobs=True)
    parts = parse(messages=[{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                          {"type": "text", "text": "2+2?"}]}])
    assert parts.prompt_ids == r.prompt_ids
    turns = lambda role: [{"role": role, "content": "Be brief."}, *msg]  # noqa: E731
    assert parse(messages=turns("developer")).prompt_ids == parse(messages=turns("system")).prompt_ids
    assert parse(messages=turns("developer")).prompt_ids != r.prompt_ids


def test_the_server_s_reply_names_its_model_counts_its_tokens_and_follows_the_seed(served):
    """The response's model, id, object and usage (prompt tokens as the chat template renders them, not the padded
    bucket; total = prompt + completion), and a request's seed deciding its sample (mutation review, session 46)."""
    import urllib.request

    model, url = served
    msg = [{"role": "user", "content": "What is 3 + 4?"}]

    def post(**kw):
        req = urllib.request.Request(f"{url}/chat/completions", json.dumps({"model": "x", "messages": msg, **kw})
                                     .encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())

    out = post(temperature=0, max_tokens=5)
    prompt = model.tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True, return_dict=False)
    usage, [choice] = out["usage"], out["choices"]
    assert (out["model"], out["object"], out["id"][:9]) == ("tiny", "chat.completion", "chatcmpl-")
    assert usage["prompt_tokens"] == len(prompt) and 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length") and choice["message"]["role"] == "assistant"
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 5
    text = lambda seed: post(temperature=1.0, seed=seed)["choices"][0]["message"]["content"]  # noqa: E731
    assert text(5) == text(5)
    assert len({text(s) for s in range(4)}) > 1
    # a seed past 32 bits is its own: jax.random.key keeps the low 32 bits, so 2**32 + 5 sampled as 5 (session 55)
    assert text(2**32 + 5) != text(5) and text(-5) != text(2**32 - 5)


def test_a_request_seed_keys_its_sample_with_all_its_64_bits():
    """`seed_key`: `jax.random.key(seed)` from 0 to 2**32 - 1 (the samples of earlier versions), past it the low 32
    bits' key folded with the high 32 (by hand: 2**32 + 5 is key(5) folded with 1, -5 is key(2**32 - 5) folded with
    2**32 - 1), so no two seeds of OpenAI's int64 range share a key by truncation."""
    import jax

    from reftjax.serve import seed_key

    data = lambda k: jax.random.key_data(k).tolist()  # noqa: E731
    for s in (0, 5, 2**31, 2**32 - 1):
        assert data(seed_key(s)) == data(jax.random.key(s))
    assert data(seed_key(2**32 + 5)) == data(jax.random.fold_in(jax.random.key(5), 1))
    assert data(seed_key(-5)) == data(jax.random.fold_in(jax.random.key(2**32 - 5), 2**32 - 1))
    assert data(seed_key(2**63 - 1)) == data(jax.random.fold_in(jax.random.key(2**32 - 1), 2**31 - 1))
    keys = [data(seed_key(s)) for s in (5, 2**32 + 5, 2**33 + 5, -5, 2**32 - 5, -2**63, 0)]
    assert len({str(k) for k in keys}) == len(keys)


def test_the_batcher_groups_only_requests_of_the_same_sampling_settings():
    """One batch is one `rollout` call with one SamplingConfig: a greedy request batched with sampling ones would be
    sampled (mutation review, session 46). A scripted engine records the batches."""
    from reftjax.serve import Batcher, Request, ServeConfig

    class Recorder:
        cfg = ServeConfig(batch_size=4, batch_wait_ms=300)

        def __init__(self):
            self.batches = []

        def run(self, batch):
            self.batches.append([(r.temperature, r.top_p) for r in batch])
            return [{"text": str(r.seed)} for r in batch]

    engine = Recorder()
    batcher = Batcher(engine)
    settings = [(0.0, 1.0), (1.0, 1.0), (0.0, 0.5), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0)]
    futures = [batcher.submit(Request((1, 2), 4, t, p, i)) for i, (t, p) in enumerate(settings)]
    assert [f.result(timeout=30)["text"] for f in futures] == [str(i) for i in range(6)]
    assert sorted(map(len, engine.batches)) == [1, 2, 3]  # greedy (any top_p), T=1, T=1 with top_p 0.5
    for batch in engine.batches:
        assert len({(t == 0, t, p if t else 1.0) for t, p in batch}) == 1, engine.batches


def test_the_judge_is_asked_as_configured_and_only_busy_statuses_are_retried(judge, monkeypatch):
    """What no test looked at (mutation review C, session 56): the request's Content-Type (urllib's default is a form
    body, which JSON APIs may refuse), the grader's `timeout` and `retries` reaching each request (the defaults, 120 s
    and 3, served every test alike), which statuses are retried (408, 409, 429, 5xx; not 4xx refusals) and which
    errors mark the endpoint down for the rest of the batch."""
    import time

    from reftjax.graders import judge as J

    slept = []
    monkeypatch.setattr(J, "time", type("T", (), {"sleep": staticmethod(slept.append)}))  # back-off waits recorded
    j = judge(lambda body: (200, "1"))
    assert build_grader(_score_cfg(j.url)).grade_batch([{"q": "q"}], ["a"])[0].score == 1.0
    assert {k.lower(): v for k, v in j.headers[-1].items()}["content-type"] == "application/json"
    j.reply = lambda body: (503, "busy")
    retried = build_grader(_score_cfg(j.url, retries=1)).grade_batch([{"q": "q"}], ["a"])[0]
    assert len(j.requests) == 1 + 2 and retried.details.get("grader_fault") and "HTTP 503" in retried.error
    slept.clear()
    with pytest.raises(J.JudgeError):
        J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=3)
    assert slept == [0.5, 1.0, 2.0]  # doubling
    j.requests.clear()
    j.reply = lambda body: (200, None)  # a null content (a refusal) is no reply text
    with pytest.raises(J.JudgeError, match="the reply's content is None, not text"):
        J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=1)
    assert len(j.requests) == 1

    class NotJson(_Quiet):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            asked.append(1)
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"<html")

    asked = []
    with _serving(NotJson) as url, pytest.raises(J.JudgeError, match="the reply is not JSON"):
        J.chat_completion(url, {"model": "judge", "messages": []}, retries=2)
    assert asked == [1]  # an answer, not a busy endpoint: not asked again
    for status, again in [(408, True), (409, True), (429, True), (500, True), (502, True), (504, True),
                          (400, False), (401, False), (404, False), (422, False)]:
        j.requests.clear()
        j.reply = lambda body, s=status: (s, "no") if len(j.requests) == 1 else (200, "ok")
        if again:
            assert J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=1) == "ok", status
        else:
            with pytest.raises(J.JudgeError, match=f"HTTP {status}: ") as info:
                J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=1)
            assert info.value.unreachable is False
        assert len(j.requests) == (2 if again else 1), status
    j.reply = lambda body: (503, "busy")  # still busy after the retries: down, the batch's other rows not sent
    with pytest.raises(J.JudgeError) as info:
        J.chat_completion(j.url, {"model": "judge", "messages": []}, retries=0)
    assert info.value.unreachable is True

    class Slow(_Quiet):
        def do_POST(self):  # noqa: N802
            time.sleep(3)

    with _serving(Slow) as url:
        start = time.monotonic()
        grade = build_grader(_score_cfg(url, timeout=0.3, retries=0)).grade_batch([{"q": "q"}], ["a"])[0]
        assert time.monotonic() - start < 2.5 and grade.details.get("grader_fault") and "timed out" in grade.error


@pytest.mark.parametrize("reply,score", [
    ('{"score": 2, "result": 3}', 3.0),  # `result`, else `score`
    ('{"result": true}', None), ('{"score": false}', None),  # a boolean is no score
    ("My final overall score: 7", 7.0), ("So my final overall score: 7", None),  # up to three words before it
])
def test_score_verdict_edges(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply,label", [
    ('{"label": "Correct"}', "correct"), ('{"verdict": "correct"}', None),  # `result` or `label`, no other key
    ("Correct !", "correct"), ("  INCORRECT  ", "incorrect"), ("in correct", None),
])
def test_label_verdict_edges(reply, label):
    assert parse_label(reply, ("correct", "incorrect")) == label


def test_a_label_passes_only_as_a_passing_label_and_configs_keep_their_roles(judge):
    """A third label outside `passing_labels` scores 0 (any case in the reply); `passing_labels` must name labels as
    written (a case variant passed nothing: the parsed label is the labels' spelling); a `developer` turn and text
    blocks of type `text` are taken and sent as written; a range of width 0 is refused (mutation review C, session
    56)."""
    j = judge(lambda body: (200, _user(body).split(": ")[1]))
    cfg = {"type": "label_model", "model": "judge", "base_url": j.url,
           "input": [{"role": "developer", "content": [{"type": "text", "text": "Grade."}]},
                     {"role": "user", "content": "Grade: {{sample.output_text}}"}],
           "labels": ["good", "fair", "poor"], "passing_labels": ["good", "fair"]}
    grades = build_grader(cfg).grade_batch([{}] * 4, ["GOOD", "Fair.", "poor", "Poor!"])
    assert [(gr.score, gr.extracted) for gr in grades] == [(1.0, "good"), (1.0, "fair"), (0.0, "poor"), (0.0, "poor")]
    assert all(gr.error is None for gr in grades)
    assert j.requests[0]["messages"][0] == {"role": "developer", "content": "Grade."}
    with pytest.raises(ConfigError, match=r"passing_labels: \['Good'\] are not in labels"):
        build_grader({**cfg, "passing_labels": ["Good"]})
    with pytest.raises(ConfigError, match=r"grader\.range: must be \[low, high\] with low < high"):
        build_grader(_score_cfg(j.url, range=[5, 5]))


def test_the_server_s_defaults_and_bounds(smollm_tokenizer):
    """parse_request's OpenAI defaults (temperature 1, top_p 1, no seed), the int64 seed bounds, an assistant turn
    taken and a tool turn refused naming its index, a prompt exactly at the longest bucket taken, and bodies that are
    no request (mutation review C, session 56)."""
    from reftjax.serve import RequestError, ServeConfig, parse_request

    msg = [{"role": "user", "content": "What is 2+2?"}]
    parse = lambda buckets=(128,), **kw: parse_request({"messages": msg, **kw}, smollm_tokenizer,  # noqa: E731
                                                       ServeConfig(max_new_tokens=12, prompt_buckets=buckets), {})
    r = parse()
    assert (r.temperature, r.top_p, r.seed) == (1.0, 1.0, None)
    assert parse(seed=2**63 - 1).seed == 2**63 - 1 and parse(seed=-2**63).seed == -2**63
    for bad in (dict(seed=2**63), dict(seed=-2**63 - 1), dict(seed=1.5)):
        with pytest.raises(RequestError, match="seed: .* is out of range"):
            parse(**bad)
    chat = [*msg, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert len(parse(messages=chat).prompt_ids) > len(r.prompt_ids)
    with pytest.raises(RequestError, match=r"messages\[1\]: must have a role"):
        parse(messages=[*msg, {"role": "tool", "content": "4"}])
    n = len(r.prompt_ids)
    assert parse(buckets=(n // 2, n)).prompt_ids == r.prompt_ids
    with pytest.raises(RequestError, match=f"the prompt is {n} tokens, over the longest prompt bucket {n - 1}"):
        parse(buckets=(n - 1,))
    for body, message in (([{"messages": msg}], "the body must be a JSON object"), ({"messages": []}, "non-empty"),
                          ({"messages": msg, "n": 0}, "only n=1"), ({"messages": msg, "stream": True}, "only n=1")):
        with pytest.raises(RequestError, match=message):
            parse_request(body, smollm_tokenizer, ServeConfig(), {})


def test_the_server_s_error_bodies_are_openai_s(smollm_tokenizer):
    """A body that is not JSON is a 400 `invalid_request_error` (not a 500), a batch that fails a 500
    `server_error` naming the exception, and a reply's usage adds up. A scripted batcher stands in for the engine
    (mutation review C, session 56)."""
    import urllib.error
    import urllib.request
    from concurrent.futures import Future

    from reftjax.serve import ServeConfig, make_handler

    class Scripted:
        def submit(self, request):
            fut = Future()
            if request.temperature == 0:
                fut.set_result({"text": "4", "finish_reason": "stop", "prompt_tokens": len(request.prompt_ids),
                                "completion_tokens": 2})
            else:
                fut.set_exception(RuntimeError("out of memory"))
            return fut

    def post(url, data):
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/chat/completions", data), timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    msg = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with _serving(make_handler("m", smollm_tokenizer, ServeConfig(), Scripted())) as url:
        for body in (b'{"messages": [', json.dumps(dict(msg, temperature=3)).encode()):
            status, out = post(url, body)
            assert status == 400 and set(out) == {"error"} and out["error"]["type"] == "invalid_request_error"
        status, out = post(url, json.dumps(msg).encode())
        assert (status, out) == (500, {"error": {"message": "RuntimeError: out of memory", "type": "server_error"}})
        status, out = post(url, json.dumps(dict(msg, temperature=0)).encode())
        prompt = len(smollm_tokenizer.apply_chat_template(msg["messages"], add_generation_prompt=True, tokenize=True,
                                                          return_dict=False))
        assert status == 200 and out["choices"][0]["message"] == {"role": "assistant", "content": "4"}
        assert out["usage"] == {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2}


def test_the_server_samples_with_the_request_s_seed_else_a_fresh_key(served, monkeypatch):
    """A seeded batch samples with `jax.random.key(seed)`; unseeded batches each with a key of their own (a key 0
    for all of them, or a seed ignored, passed every test). The decoder is scripted to record its key (mutation
    review C, session 56)."""
    import types

    import jax

    from reftjax import rollout as R
    from reftjax.serve import Engine, Request, ServeConfig

    model, _ = served
    engine = Engine(model.params, model.config, model.tokenizer, ServeConfig(batch_size=1, max_new_tokens=4,
                                                                             prompt_buckets=(16,)))
    keys = []

    def fake(params, tokens, mask, rng, **kw):
        keys.append(tuple(np.asarray(jax.random.key_data(rng)).tolist()))
        return types.SimpleNamespace(tokens_BxN=np.full((1, 4), engine.eos[0], np.int32), lengths_B=np.ones(1, int),
                                     finished_B=np.ones(1, bool))

    monkeypatch.setattr(R, "rollout", fake)
    for seed in (5, 5, None, None, 7):
        engine.run([Request((1, 2), 4, 1.0, 1.0, seed)])
    five, seven = (tuple(np.asarray(jax.random.key_data(jax.random.key(s))).tolist()) for s in (5, 7))
    assert keys[0] == keys[1] == five and keys[4] == seven
    assert len({keys[2], keys[3], five, seven}) == 4


def test_seeds_that_differ_above_32_bits_sample_differently(served, monkeypatch):
    """The engine keys a batch with all 64 bits of its seed (`serve.seed_key`): `jax.random.key` keeps the low 32, so
    5 and 2**32 + 5, -1 and 2**32 - 1 sampled alike (review C, session 56; written as a strict xfail before the
    fix)."""
    import types

    import jax

    from reftjax import rollout as R
    from reftjax.serve import Engine, Request, ServeConfig

    model, _ = served
    engine = Engine(model.params, model.config, model.tokenizer, ServeConfig(batch_size=1, max_new_tokens=4,
                                                                             prompt_buckets=(16,)))
    keys = []
    monkeypatch.setattr(R, "rollout", lambda params, tokens, mask, rng, **kw: (
        keys.append(tuple(np.asarray(jax.random.key_data(rng)).tolist())),
        types.SimpleNamespace(tokens_BxN=np.full((1, 4), engine.eos[0], np.int32), lengths_B=np.ones(1, int),
                              finished_B=np.ones(1, bool)))[1])
    for seed in (5, 2**32 + 5, -1, 2**32 - 1):
        engine.run([Request((1, 2), 4, 1.0, 1.0, seed)])
    assert len(set(keys)) == 4, keys
