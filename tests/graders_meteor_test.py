"""text_similarity's `meteor`: nltk's METEOR on BLEU's tokens, with WordNet found where nltk looks for it.

WordNet's real data is not in the repository (nor on CI), so the tests write a small WordNet in its own format
(`write_wordnet`: data files whose synset offsets are the lines' byte offsets, as WordNet's are) and point
`nltk.data.path` at it."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest

nltk = pytest.importorskip("nltk")  # (the test extra's rouge-score brings it)

from nltk.corpus.reader.wordnet import WordNetCorpusReader  # noqa: E402
from nltk.translate.meteor_score import single_meteor_score  # noqa: E402

from reftjax.graders import __main__ as graders_cli  # noqa: E402
from reftjax.graders.build import ConfigError, build_grader, check_wordnet  # noqa: E402
from reftjax.graders.openai import _bleu_tokens, meteor, wordnet  # noqa: E402

# WordNet 3.0's lexicographer files, the first ones (a synset names its file by number)
_LEXNAMES = ["adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1", "noun.artifact 1"]
_HEADER = "  1 This is a test copy in WordNet 3.0's format.  WordNet 3.0 Copyright 2006 by Princeton University.\n"


def write_wordnet(root, synsets: dict) -> None:
    """WordNet in nltk's layout under `root/corpora/wordnet`; `synsets`: pos ("n", "v", "a", "r") -> list of
    (lexicographer file number, [lemmas])."""
    d = root / "corpora" / "wordnet"
    d.mkdir(parents=True)
    (d / "lexnames").write_text("".join(f"{i:02d}\t{n.replace(' ', chr(9))}\n" for i, n in enumerate(_LEXNAMES)))
    for pos, suffix in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
        data, index = _HEADER, {}
        for lexfile, lemmas in synsets.get(pos, []):
            offset = len(data.encode())
            words = " ".join(f"{w} 0" for w in lemmas)
            data += f"{offset:08d} {lexfile:02d} {pos} {len(lemmas):02x} {words} 000 | a test synset\n"
            for w in lemmas:
                index.setdefault(w, []).append(offset)
        (d / f"data.{suffix}").write_text(data)
        (d / f"index.{suffix}").write_text(_HEADER + "".join(
            f"{w} {pos} {len(offs)} 0 {len(offs)} 0 {' '.join(f'{o:08d}' for o in offs)}  \n"
            for w, offs in sorted(index.items())))
        (d / f"{suffix}.exc").write_text("")
    (d / "index.sense").write_text("")


@pytest.fixture
def tiny_wordnet(tmp_path, monkeypatch):
    write_wordnet(tmp_path, {"n": [(6, ["car", "auto", "automobile"]), (5, ["cat"])], "a": [(0, ["fast", "quick"])]})
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with warnings.catch_warnings():  # "The multilingual functions are not available": not used
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(tmp_path / "corpora" / "wordnet"), None)


def _meteor_cfg(**kw):
    return {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
            "evaluation_metric": "meteor", **kw}


def test_meteor_scores_as_the_papers_formula_and_nltk_with_wordnet_synonyms(tiny_wordnet):
    # by hand (Banerjee and Lavie 2005, nltk's alpha 0.9, beta 3, gamma 0.5): m matches in c chunks over a
    # hypothesis of h and a reference of r tokens score F * (1 - 0.5 (c / m)^3), F = P R / (0.9 P + 0.1 R)
    def by_hand(m, c, h, r):
        p, q = m / h, m / r
        return p * q / (0.9 * p + 0.1 * q) * (1 - 0.5 * (c / m) ** 3)

    assert meteor("The auto is red.", "the car is red .") == pytest.approx(by_hand(5, 1, 5, 5), abs=1e-12)  # synonym
    assert meteor("quick", "fast") == pytest.approx(0.5, abs=1e-12)  # one match, one chunk
    assert meteor("The truck is red.", "the car is red.") == pytest.approx(by_hand(4, 2, 5, 5), abs=1e-12)
    assert meteor("cats sat", "the cat sat down") == pytest.approx(by_hand(2, 1, 2, 4), abs=1e-12)  # a stem match
    assert meteor("automobile", "car") == 0.0  # nltk looks synonyms up by Porter stem: "automobil" is no lemma
    assert meteor("", "car") == meteor("car", "") == meteor("!", "") == 0.0
    pairs = [("The auto is red.", "the car is red ."), ("A fast cat, a quick car!", "the quick auto and the cat"),
             ("nothing in common", "the car"), ("car car car", "car"), ("Paris.", "Paris")]
    grader = build_grader(_meteor_cfg())
    grades = grader.grade_batch([{"answer": r} for _, r in pairs], [c for c, _ in pairs])
    for (c, r), g in zip(pairs, grades):
        want = single_meteor_score(_bleu_tokens(r), _bleu_tokens(c), wordnet=tiny_wordnet)
        assert g.error is None and g.score == pytest.approx(want, abs=1e-12), (c, r)
    assert 0 < grades[1].score < grades[0].score < 1 and grades[2].score == 0.0
    # the same nltk call on whitespace tokens would miss "red." against "red" (the tokens are BLEU's)
    assert single_meteor_score("the car is red .".split(), "The auto is red.".split(), wordnet=tiny_wordnet) < \
        grades[0].score


def test_meteor_without_wordnet_or_nltk_is_refused_before_a_run_naming_the_grader_and_the_install(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    multi = build_grader({"type": "multi", "calculate_output": "0.5 * m + 0.5 * s", "graders": {
        "m": _meteor_cfg(), "s": {**_meteor_cfg(), "evaluation_metric": "bleu"}}})  # (the spec itself is valid)
    with pytest.raises(ConfigError, match=r"grader\.graders\.m: evaluation_metric 'meteor' needs WordNet's data "
                                          r"for nltk, found in none of .*nltk\.downloader wordnet"):
        check_wordnet(multi)
    check_wordnet(build_grader({**_meteor_cfg(), "evaluation_metric": "bleu"}))  # no METEOR: nothing asked
    # a copy that cannot be read (no lexnames) says where it is
    write_wordnet(tmp_path, {"n": [(6, ["car"])]})
    (tmp_path / "corpora" / "wordnet" / "lexnames").unlink()
    with pytest.raises(ConfigError, match=r"grader: WordNet's data at .*corpora/wordnet cannot be read"):
        check_wordnet(build_grader(_meteor_cfg()))
    # the graders CLI refuses it before grading anything, with its file's name
    (tmp_path / "g.json").write_text(json.dumps(_meteor_cfg()))
    assert graders_cli.main(["validate", "--grader", str(tmp_path / "g.json")]) == 2
    assert f"error: {tmp_path / 'g.json'}: grader: WordNet's data" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nltk.data", None)  # nltk not installed
    with pytest.raises(ConfigError, match=r"grader: evaluation_metric 'meteor' needs nltk \(pip install nltk; .*\) "
                                          r"and WordNet's data \(python -m nltk\.downloader wordnet"):
        wordnet()


def test_meteor_through_the_graders_cli_and_a_new_search_path(tmp_path, monkeypatch, capsys, tiny_wordnet):
    (tmp_path / "g.json").write_text(json.dumps(_meteor_cfg()))
    samples = [({"answer": "the car is red"}, "The auto is red"), ({"answer": "fast"}, "quick")]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"item": i, "sample": {"output_text": s}}) + "\n"
                                           for i, s in samples))
    assert graders_cli.main(["run", "--grader", str(tmp_path / "g.json"), "--samples",
                            str(tmp_path / "s.jsonl")]) == 0
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert scores == pytest.approx([1 - 0.5 * (1 / 4) ** 3, 0.5], abs=1e-12)
    # WordNet is loaded once per search path: another path with "auto" missing scores without the synonym
    other = tmp_path / "other"
    write_wordnet(other, {"n": [(6, ["car", "automobile"])]})
    monkeypatch.setattr(nltk.data, "path", [str(other)])
    assert wordnet() is wordnet() and meteor("auto", "car") == 0.0
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert math.isclose(meteor("auto", "car"), 0.5)
    # as nltk's downloader leaves it: corpora/wordnet.zip holding wordnet/...
    zipped = tmp_path / "zipped"
    write_wordnet(zipped, {"a": [(0, ["fast", "quick"])]})
    corpora = zipped / "corpora"
    with zipfile.ZipFile(corpora / "wordnet.zip", "w") as z:
        z.writestr("wordnet/", "")
        for f in sorted((corpora / "wordnet").iterdir()):
            z.write(f, f"wordnet/{f.name}")
    shutil.rmtree(corpora / "wordnet")
    monkeypatch.setattr(nltk.data, "path", [str(zipped)])
    assert isinstance(wordnet().root, nltk.data.ZipFilePathPointer) and meteor("quick", "fast") == 0.5


def test_meteor_in_a_command_that_keeps_torch_out(tmp_path):
    # reftjax's commands set sys.modules["torch"] = None (`host.keep_torch_out`); `import nltk` imports scipy.stats,
    # whose array-API helpers took that None for a module: the first METEOR run of `python -m experiments.gsm8k_reft`
    # failed with AttributeError ('NoneType' object has no attribute 'Tensor') before training
    write_wordnet(tmp_path, {"a": [(0, ["fast", "quick"])]})
    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys; from reftjax.host import keep_torch_out; assert keep_torch_out(); "
            "from reftjax.graders.openai import meteor; print(meteor('quick', 'fast'), sys.modules['torch'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NLTK_DATA": str(tmp_path), "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.split() == ["0.5", "None"], done.stderr[-2000:]
