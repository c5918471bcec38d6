"""`text_similarity` with `evaluation_metric: "cosine"` against a scripted OpenAI-compatible embeddings endpoint,
checked against NumPy's cosine of the vectors the endpoint gave."""
import functools
import http.server
import json
import logging
import threading

import numpy as np
import pytest

from reftjax.graders import ConfigError, build_grader, check_judges
from reftjax.graders.base import is_fault
from reftjax.graders.judge import PING, embeddings


def _vector(text):
    """Letter counts; a text starting with '-' points the other way (a negative cosine)."""
    counts = np.array([text.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"], float)
    return list(-counts if text.startswith("-") else counts)


class _Embedder:
    """A scripted `/v1/embeddings` (and `/v1/models`) endpoint in a thread; `reply(body)` may return
    (status, message) to refuse; records each request's body and headers. Rows come back in reverse order, each
    with its index (the API's `index` is what places them)."""

    def __init__(self, reply=None, models=("emb",)):
        self.requests, self.headers = [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": m} for m in models]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                refused = reply(body) if reply else None
                if refused:
                    return self._send(refused[0], {"error": {"message": refused[1]}})
                rows = [{"object": "embedding", "index": i, "embedding": _vector(t)}
                        for i, t in enumerate(body["input"])]
                self._send(200, {"object": "list", "data": rows[::-1], "model": body["model"]})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=functools.partial(self.server.serve_forever, poll_interval=0.01), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def embedder():
    made = []
    yield lambda *a, **kw: made.append(_Embedder(*a, **kw)) or made[-1]
    for e in made:
        e.server.shutdown()
        e.server.server_close()


def _cfg(url, **kw):
    return {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
            "evaluation_metric": "cosine", "model": "emb", "base_url": url, **kw}


def _numpy_cosine(a, b):
    u, v = np.array(_vector(a)), np.array(_vector(b))
    return float(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), 0, 1))


def test_cosine_is_numpy_s_cosine_of_the_endpoint_s_vectors(embedder, monkeypatch, caplog):
    """Each distinct text is asked for once, at most 64 a request, with the model and the key of `api_key_env`; a
    score is NumPy's cosine of the two vectors, clipped to [0, 1] (a negative one logged); equal texts score 1 and an
    empty one 0 without a request; the answer recorded is the rendered input."""
    e = embedder()
    monkeypatch.setenv("MY_KEY", "sk-test")
    g = build_grader(_cfg(e.url, api_key_env="MY_KEY", max_concurrency=2))
    words = ["cat", "dog", "mat", "sat", "hat", "bird", "fish", "tree", "zebra", "quiz"]
    texts = [f"{words[i % 10]} {words[(3 * i) % 10]} {i}" for i in range(150)]
    texts += ["the cat sat", "", "-the cat sat", texts[0], "The cat sat on a mat"]
    items = [{"answer": "the cat sat"}] * len(texts)
    with caplog.at_level(logging.WARNING, "reftjax.graders"):
        grades = g.grade_batch(items, texts)
    assert [gr.score for gr in grades] == pytest.approx([_numpy_cosine(t, "the cat sat") if t else 0.0
                                                        for t in texts], abs=1e-12)
    assert grades[150].score == 1.0 and grades[151].score == 0.0 and grades[152].score == 0.0
    assert 0 < grades[154].score < 1 and sum(0 < gr.score < 1 for gr in grades[:150]) > 100
    assert [gr.extracted for gr in grades] == texts and not any(gr.error for gr in grades)
    assert "outside [0, 1]: clipped to 0" in caplog.text
    asked = [t for body in e.requests for t in body["input"]]
    assert sorted(asked) == sorted({*texts[:150], "-the cat sat", "The cat sat on a mat", "the cat sat"})
    assert max(len(body["input"]) for body in e.requests) == 64 and len(e.requests) == 3
    assert {body["model"] for body in e.requests} == {"emb"} and set(e.requests[0]) == {"model", "input"}
    assert {h["Authorization"] for h in e.headers} == {"Bearer sk-test"}


def test_a_failed_request_faults_its_rows_and_a_missing_field_is_unanswered(embedder):
    """A request the endpoint refuses is asked again a text at a time: the refused text faults its rows (grader
    faults, as a judge's), the others are scored; a reply that is not one vector a text faults its rows; an endpoint
    that cannot be reached faults every row; a completion without the field a template reads is unanswered."""
    e = embedder(lambda body: (400, "no poison") if "poison" in body["input"] else None)
    g = build_grader(_cfg(e.url, max_concurrency=1, retries=0))
    texts = ["poison"] + [f"answer {i}" for i in range(1, 40)]
    items = [{"answer": f"gold {i}"} for i in range(40)]  # two texts a row: rows 0-31 in the first request
    items[5] = {"answer": "poison"}  # a reference the endpoint refuses
    grades = g.grade_batch(items, texts)
    assert [i for i, gr in enumerate(grades) if gr.error] == [0, 5]
    assert all(is_fault(grades[i]) and "HTTP 400" in grades[i].error and "no poison" in grades[i].error
               for i in (0, 5))
    assert [gr.score for gr in grades] == pytest.approx([0.0 if t == "poison" or i["answer"] == "poison" else
                                                         _numpy_cosine(t, i["answer"]) for t, i in zip(texts, items)])
    # 79 distinct texts ("poison" twice): the first request (64 texts: rows 0-31), each of them again alone, the
    # second request (the other 15)
    assert [len(body["input"]) for body in e.requests] == [64] + [1] * 64 + [15]
    with pytest.MonkeyPatch.context() as mp:  # two vectors whatever is asked: for three texts, then for each alone
        mp.setattr("reftjax.graders.judge._post_json", lambda url, payload, **kw: {"data": [
            {"index": 0, "embedding": [1.0, 0.0]}, {"index": 1, "embedding": [0.0, 1.0]}]})
        grades = build_grader(_cfg(e.url)).grade_batch([{"answer": "x y"}] * 2, ["a", "b"])
    assert all(is_fault(gr) and "one finite vector of one size per text (1 asked" in gr.error
               for gr in grades)
    with pytest.MonkeyPatch.context() as mp:  # vectors of two sizes from two requests
        mp.setattr("reftjax.graders.judge._post_json", lambda url, payload, **kw: {"data": [
            {"index": i, "embedding": [1.0] * (2 + len(t))} for i, t in enumerate(payload["input"])]})
        one = build_grader(_cfg(e.url, max_concurrency=1))
        mp.setattr("reftjax.graders.judge._EMBED_CHUNK", 1)
        [grade] = one.grade_batch([{"answer": "xy"}], ["abc"])
    assert is_fault(grade) and "vectors of 5 and 4 numbers" in grade.error
    def no_threads(*args, **kw):
        raise RuntimeError("can't start new thread")

    with pytest.MonkeyPatch.context() as mp:  # graders never raise into the trainer
        mp.setattr("concurrent.futures.ThreadPoolExecutor", no_threads)
        grades = build_grader(_cfg(e.url)).grade_batch([{"answer": "xy"}] * 2, ["abc", "xy"])
    assert is_fault(grades[0]) and grades[0].error == "grader error: RuntimeError: can't start new thread"
    assert len(grades) == 2 and is_fault(grades[1])  # (the whole batch: where it failed is not known)
    down = build_grader(_cfg("http://127.0.0.1:9/v1", retries=0, max_concurrency=1))
    grades = down.grade_batch([{"answer": f"r{i}"} for i in range(40)], [f"t{i}" for i in range(40)])
    assert all(is_fault(gr) for gr in grades) and "not asked" in grades[-1].error
    g = build_grader(_cfg(e.url, input="{{sample.output_json.answer}}"))
    missing, fine = g.grade_batch([{"answer": "cat"}] * 2, ["not json", '{"answer": "a cat"}'])
    assert missing.score == 0 and missing.error and not is_fault(missing)
    assert fine.score == pytest.approx(_numpy_cosine("a cat", "cat"))


def test_embeddings_places_rows_by_index_and_refuses_what_is_no_vector(embedder, monkeypatch):
    e = embedder()
    assert embeddings(e.url, "emb", ["ab", "-c"]) == [_vector("ab"), _vector("-c")]  # (sent back reversed)
    for reply in ({"data": [{"index": 0, "embedding": [1.0, float("nan")]}]},
                  {"data": [{"index": 1, "embedding": [1.0]}]},
                  {"data": [{"index": 0, "embedding": []}]},
                  {"data": [{"index": 0, "embedding": "1 2"}]},
                  {"object": "error"}):
        monkeypatch.setattr("reftjax.graders.judge._post_json", lambda url, payload, **kw: reply)
        with pytest.raises(Exception, match="/v1/embeddings: "):
            embeddings(e.url, "emb", ["one"])


def test_check_judges_asks_an_embedding_endpoint_once_before_a_run(embedder, caplog):
    e = embedder(models=("other",))
    with caplog.at_level(logging.WARNING, "reftjax.graders"):
        check_judges(build_grader(_cfg(e.url)))
    assert e.requests == [{"model": "emb", "input": [PING]}]
    assert "the embedding endpoint" in caplog.text and "does not list model 'emb'" in caplog.text
    refusing = embedder(lambda body: (404, "no such model"))
    multi = {"type": "multi", "calculate_output": "a", "graders": {"a": _cfg(refusing.url, retries=0)}}
    with pytest.raises(ConfigError, match=r"grader\.graders\.a: the embedding endpoint refuses the grader's request "
                                          r"\(model\): .*HTTP 404: .*no such model"):
        check_judges(build_grader(multi))
    with pytest.raises(ConfigError, match=r"grader: the embedding endpoint http://127.0.0.1:9/v1/models cannot be "
                                          r"reached"):
        check_judges(build_grader(_cfg("http://127.0.0.1:9/v1")))


def test_cosine_configs_take_the_endpoint_keys_and_other_metrics_do_not(monkeypatch, embedder):
    monkeypatch.setenv("REFTJAX_JUDGE_URL", "http://judge.example/v1")
    g = build_grader({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                      "evaluation_metric": "cosine", "name": "sim", "pass_threshold": 1})
    assert (g.base_url, g.model, g.api_key_env, g.timeout, g.max_concurrency, g.retries) == \
        ("http://judge.example/v1", "text-embedding-3-large", "OPENAI_API_KEY", 120.0, 16, 3)
    assert build_grader(_cfg("u", model=None)).model == "text-embedding-3-large"  # (null is "not set")
    for change, message in (({"api_key": "sk-1"}, r"grader\.api_key: a key does not belong in the config"),
                            ({"model": ""}, r"grader\.model: must be a non-empty string"),
                            ({"retries": 1.5}, r"grader\.retries: must be an integer"),
                            ({"sampling_params": {}}, r"unknown keys \['sampling_params'\]"),
                            ({"reference": "{item.answer}"}, r"grader\.reference: template text"),
                            ({"evaluation_metric": "bleu"}, r"unknown keys \['base_url', 'model'\]")):
        with pytest.raises(ConfigError, match=message):
            build_grader({**_cfg("http://x/v1"), **change})
    with pytest.raises(ConfigError, match=r"'ter' is not supported .*gleu, meteor, rouge_1.*rouge_l, cosine\)"):
        build_grader({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "ter"})
    e = embedder()
    multi = build_grader({"type": "multi", "calculate_output": "0.5 * sim + 0.5 * exact", "graders": {
        "sim": _cfg(e.url),
        "exact": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                  "operation": "eq"}}})
    grades = multi.grade_batch([{"answer": "cat"}] * 2, ["cat", "a cat"])
    assert [gr.score for gr in grades] == pytest.approx([1.0, 0.5 * _numpy_cosine("a cat", "cat")])
    with pytest.raises(KeyError, match="item.answer"):
        build_grader(_cfg(e.url)).validate({"question": "q"})


def test_the_grader_s_endpoint_settings_reach_every_request(monkeypatch):
    """`timeout`, `retries`, the key and `max_concurrency` are the config's in the batch's requests and in the
    connection check's (a request at the defaults would wait 120 s on a judge configured for 5)."""
    import concurrent.futures

    from reftjax.graders import judge

    calls, workers = [], []
    monkeypatch.setattr(judge, "embeddings", lambda url, model, texts, **kw: calls.append((url, model, kw)) or
                        [_vector(t) for t in texts])
    real = concurrent.futures.ThreadPoolExecutor
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", lambda n: workers.append(n) or real(n))
    monkeypatch.setattr(judge, "_EMBED_CHUNK", 2)
    monkeypatch.setenv("K", "sk-k")
    g = build_grader(_cfg("http://e/v1", timeout=5, retries=1, max_concurrency=3, api_key_env="K"))
    g.grade_batch([{"answer": f"r{i}"} for i in range(4)], [f"t{i}" for i in range(4)])  # 8 texts, 4 requests
    g.ping("sk-p")
    assert calls == [("http://e/v1", "emb", {"api_key": "sk-k", "timeout": 5.0, "retries": 1})] * 4 + \
        [("http://e/v1", "emb", {"api_key": "sk-p", "timeout": 5.0, "retries": 1})]
    assert workers == [3]
