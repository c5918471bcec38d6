"""GSM8K through tensorflow-datasets (array_record, no TensorFlow), built offline."""
import json
import pathlib
import sys
import shutil
import tempfile

import pytest

from reftjax.data.records import DataError
from reftjax.data.sources import cache_dir, gsm8k_local_dir, load_examples, load_gsm8k


@pytest.fixture(scope="module")
def built(shared_data, tmp_path_factory):
    """The full GSM8K built once into a temporary cache dir (~3 s)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    splits = {s: load_gsm8k(s, data_dir=data_dir, local_dir=shared_data / "gsm8k")
              for s in ("train", "test")}
    return data_dir, splits


def test_tensorflow_is_not_needed(built):
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_gsm8k_all_examples_with_answers_from_the_hash_line(built, shared_data, split, count):
    examples = built[1][split]
    raw = [json.loads(l) for l in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    assert len(examples) == len(raw) == count
    for i, (ex, r) in enumerate(zip(examples, raw)):
        final = r["answer"].splitlines()[-1]
        assert final.startswith("#### ")
        assert ex.answer_value == float(final[5:].replace(",", "")), i
        assert ex.question == r["question"].strip() and ex.idx == i
        assert "####" not in ex.cot and r["answer"].startswith(ex.cot)


def test_second_load_reuses_the_cache(built, shared_data, monkeypatch):
    data_dir, splits = built
    from reftjax.data import gsm8k_builder

    def no_rebuild(self, path):
        raise AssertionError("rebuilt")
    monkeypatch.setattr(gsm8k_builder.Gsm8kReft, "_generate_examples", no_rebuild)
    again = load_gsm8k("test", data_dir=data_dir, local_dir=shared_data / "gsm8k")
    assert [e.question for e in again] == [e.question for e in splits["test"]]


def test_a_changed_local_copy_is_built_afresh(shared_data, tmp_path, capsys):
    """The cache is keyed by the local copy's content: an edited copy (or another one) is not shadowed by
    the build of the first (was: the stale build was read silently). A build prints nothing to stdout (tfds's
    "Downloading and preparing" lines came before a command's one JSON line; review, session 30)."""
    local = tmp_path / "gsm8k"
    local.mkdir()
    for split, n in (("train", 30), ("test", 10)):
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]
        (local / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    assert len(load_gsm8k("test", data_dir=cache, local_dir=local)) == 10
    assert capsys.readouterr().out == ""
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]
    (local / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert len(load_gsm8k("test", data_dir=cache, local_dir=local)) == 4
    with pytest.raises(DataError, match=r"absent/train\.jsonl:0: file not found \(GSM8K local copy\)"):
        load_gsm8k("test", data_dir=cache, local_dir=tmp_path / "absent")


def test_failed_build_leaves_nothing(shared_data, tmp_path):
    local = tmp_path / "gsm8k"
    local.mkdir()
    (local / "test.jsonl").write_text((shared_data / "gsm8k" / "test.jsonl").read_text())
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:50]
    lines[41] = '{"question": "Q", "answer": "x\\n#### many"}'
    (local / "train.jsonl").write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train\.jsonl:42: gold answer 'many' is not a number"):
        load_gsm8k("train", data_dir=cache, local_dir=local)
    leftovers = [p.relative_to(cache) for p in cache.glob("local-*/gsm8k_reft/*")]
    assert leftovers == []
    lines[41] = lines[40]
    (local / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert len(load_gsm8k("train", data_dir=cache, local_dir=local)) == 50
    assert [p.name for p in cache.glob("local-*/gsm8k_reft/*")] == ["1.0.0"]


def test_an_empty_local_file_is_a_data_error(shared_data, tmp_path):
    """tfds's own "No examples were yielded" AssertionError (a 52-line traceback, exit 1) before session 35."""
    local = tmp_path / "gsm8k"
    local.mkdir()
    (local / "test.jsonl").write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:5]))
    (local / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"train\.jsonl:1: no examples in file"):
        load_gsm8k("test", data_dir=tmp_path / "cache", local_dir=local)


def test_locations_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(tmp_path / "g"))
    assert cache_dir() == tmp_path / "c" / "tfds" and gsm8k_local_dir() == tmp_path / "g"  # a folder of the root
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("REFTJAX_CACHE")
    monkeypatch.delenv("REFTJAX_GSM8K_DIR")
    assert cache_dir() == pathlib.Path.home() / ".cache/reftjax/tfds"
    assert gsm8k_local_dir() is None or gsm8k_local_dir().name == "gsm8k"


def test_reft_datasets_by_name(shared_data):
    assert len(load_examples("svamp-python", local_dir=shared_data / "reft")) == 3043
    with pytest.raises(ValueError, match="unknown dataset"):
        load_examples("mnist")


def test_download_path_through_tfds_download_manager(shared_data, tmp_path, monkeypatch, capsys):
    """No local copy: the builder downloads {train,test}.jsonl with tfds's DownloadManager (here from a
    local HTTP server standing in for GitHub), then builds and reads them like the local path."""
    import functools
    import http.server
    import threading

    from reftjax.data import gsm8k_builder, sources

    served = tmp_path / "www"
    served.mkdir()
    head = {"train": 30, "test": 12}
    for split, n in head.items():
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]
        (served / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    want = {s: load_gsm8k(s, data_dir=tmp_path / f"local_{s}", local_dir=served) for s in head}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=functools.partial(server.serve_forever, poll_interval=0.01), daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(gsm8k_builder, "URLS", {s: f"{base}/{s}.jsonl" for s in head})
        monkeypatch.setattr(sources, "gsm8k_local_dir", lambda override=None: None)
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.delenv(var, raising=False)
        cache = tmp_path / "cache"
        capsys.readouterr()
        got = {s: load_gsm8k(s, data_dir=cache) for s in head}
        err = capsys.readouterr().err  # (a download keeps tfds's own line; a local copy's build says so instead)
        assert "Downloading and preparing dataset" in err and "local copy" not in err, err
    finally:
        server.shutdown()
        server.server_close()
    # offline now: a rebuild (a deleted build, a version bump) reads tfds's download cache, as it did before the
    # reachability probe, which refused it (regression review, session 35)
    shutil.rmtree(cache / "gsm8k_reft")
    assert [e.question for e in load_gsm8k("test", data_dir=cache)] == [e.question for e in got["test"]]
    for split, n in head.items():
        assert len(got[split]) == n
        assert [(e.question, e.cot, e.answer_value) for e in got[split]] == \
               [(e.question, e.cot, e.answer_value) for e in want[split]]
    assert (cache / "downloads").is_dir() and any((cache / "downloads").iterdir())


def test_an_unreachable_download_fails_at_once_and_says_what_to_give(tmp_path, monkeypatch):
    """Without a local copy and without a network tfds retried for 3.4 min before failing (session 33): one HEAD
    request to the download's server first; a refused connection (a closed local port here) fails at once."""
    import socket
    import time

    from reftjax.data import gsm8k_builder, sources

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(gsm8k_builder, "URLS", {s: f"http://127.0.0.1:{port}/{s}.jsonl" for s in ("train", "test")})
    monkeypatch.setattr(sources, "gsm8k_local_dir", lambda override=None: None)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"no local copy .*--gsm8k-dir.* cannot be reached .*127\.0\.0\.1"
                                      r".*ConnectionError"):
        load_gsm8k("test", data_dir=tmp_path / "cache")
    assert time.monotonic() - t0 < 60
    assert not list((tmp_path / "cache").glob("gsm8k_reft/*/*.array_record*"))  # nothing built


def test_building_leaves_no_temporary_directories(shared_data, tmp_path, monkeypatch):
    """tfds makes an empty mkdtemp("tfds") for a GCS info lookup on every unprepared builder init; ours skips it."""
    local = tmp_path / "gsm8k"
    local.mkdir()
    for split in ("train", "test"):
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:20]
        (local / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    assert len(load_gsm8k("test", data_dir=tmp_path / "cache", local_dir=local)) == 20
    assert sorted(p.name for p in system_tmp.iterdir()) == []


def test_no_progress_silences_tfds_bars_and_restores_the_switch(shared_data, tmp_path, capfd, monkeypatch):
    """`progress=False` (the CLI's --no-progress, through `train.read_splits`) builds without tfds's bars
    ("Generating splits...", "Shuffling ..."; they printed under --no-progress: session 35's list); tfds's switch is
    as it was afterwards, and a user's own `display_progress_bar(False)` is not turned back on."""
    from tensorflow_datasets.core.utils import tqdm_utils

    from reftjax import train as T
    from reftjax.config import ExperimentConfig, from_dict, to_dict

    local = tmp_path / "gsm8k"
    local.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        lines = (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]
        (local / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(local))
    monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "quiet"))
    d = to_dict(ExperimentConfig())
    d["data"].update(n_train=8, n_val=2)
    try:
        splits = T.read_splits(from_dict(d), progress=False)
        assert (len(splits.train), len(splits.test)) == (8, 4)
        err = capfd.readouterr().err
        assert "Generating" not in err and "Shuffling" not in err and "examples/s" not in err, err
        # (its one-line messages stay, in words true of a build from a local copy: it printed "Downloading and
        # preparing dataset Unknown size" there, with nothing downloaded; session 44's list)
        assert "Downloading" not in err and "Unknown size" not in err, err
        assert f"GSM8K: building the tfds dataset from the local copy {local} (nothing is downloaded)" in err, err
        assert "GSM8K: built into " in err and "later runs read it from there" in err, err
        assert tqdm_utils._active is True

        monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "loud"))
        load_gsm8k("test", progress=True)
        assert "Generating splits" in capfd.readouterr().err  # (what the first build would have printed)

        tqdm_utils.display_progress_bar(False)  # a user's own choice
        monkeypatch.setenv("REFTJAX_CACHE", str(tmp_path / "user"))
        load_gsm8k("test", progress=True)
        assert "Generating" not in capfd.readouterr().err and tqdm_utils._active is False
    finally:
        tqdm_utils.display_progress_bar(True)


def test_the_local_copys_fingerprint_covers_both_files_to_their_last_byte(shared_data, tmp_path):
    """The build's cache folder is named by the sha256 of the whole local copy (train then test): an edit anywhere,
    the last line of a 1,319-line file too, gives another folder (a mutant hashing the first 4 KB passed: the
    rebuild test edits a small copy; mutation review, session 46)."""
    import hashlib

    from reftjax.data.sources import _local_fingerprint

    local = tmp_path / "gsm8k"
    local.mkdir()
    for split in ("train", "test"):
        (local / f"{split}.jsonl").write_bytes((shared_data / "gsm8k" / f"{split}.jsonl").read_bytes())
    first = _local_fingerprint(local)
    both = (local / "train.jsonl").read_bytes() + (local / "test.jsonl").read_bytes()
    assert first == hashlib.sha256(both).hexdigest()[:16]
    seen = {first}
    for split in ("train", "test"):
        path = local / f"{split}.jsonl"
        original = path.read_bytes()
        last = original[-4:-3]  # the last digit of the last line's '#### N"}\n'
        path.write_bytes(original[:-4] + (b"1" if last == b"0" else b"0") + original[-3:])
        seen.add(_local_fingerprint(local))
        path.write_bytes(original)
    assert len(seen) == 3 and _local_fingerprint(local) == first


def test_reft_datasets_by_name_read_text_answers_when_asked(shared_data):
    """numeric=False (the CLI's --text-answers, a MathQA-like run) reaches the ReFT datasets read by name, as it
    reaches files (a mutant dropping it for the named datasets passed: mutation review, session 46)."""
    text = load_examples("svamp-test", local_dir=shared_data / "reft", numeric=False)
    raw = json.loads((shared_data / "reft" / "svamp_test_set.json").read_text())
    assert [(e.answer, e.answer_value) for e in text] == [(r["answer_value"].strip(), None) for r in raw]


def test_an_explicit_folder_wins_over_the_environment(monkeypatch, tmp_path):
    """A folder given as an argument (--local-dir, data.local_dir) wins over REFTJAX_GSM8K_DIR / REFTJAX_REFT_DIR, as
    cache_dir's does over REFTJAX_CACHE (a mutant reading the environment first passed: mutation review, session 46)."""
    from reftjax.data.sources import reft_dir

    monkeypatch.setenv("REFTJAX_GSM8K_DIR", str(tmp_path / "env-g"))
    monkeypatch.setenv("REFTJAX_REFT_DIR", str(tmp_path / "env-r"))
    assert gsm8k_local_dir(tmp_path / "g") == tmp_path / "g" and reft_dir(tmp_path / "r") == tmp_path / "r"
    assert gsm8k_local_dir() == tmp_path / "env-g" and reft_dir() == tmp_path / "env-r"
