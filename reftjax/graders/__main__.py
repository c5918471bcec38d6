"""CLI: `python -m reftjax.graders run|validate --grader GRADER.json [--samples SAMPLES.jsonl]`.

`run` prints one JSON line per sample: {"index", "score", "extracted", "error"[, "details"]}.
Each samples line is `{"item": {...reference fields...}, "sample": {"output_text": "..."}}`.
`validate` builds the grader (and checks it against every sample's item when given), and runs a
`python` grader's imports once in the sandbox (`--preimport` adds modules it may import). A `multi` formula that
can leave [0, 1] (where scores are clipped) is a warning on stderr, and `validate` lists it under "warnings". `run`
asks a model-based grader's endpoint for its models first (`validate` stays offline).
Errors name the file and line and exit with status 2.
"""
import argparse
import json
import sys

from reftjax.graders.build import ConfigError, check_imports, check_wordnet, reach_warnings, validate_grader
from reftjax.graders.judge import check_judges
from reftjax.graders.reft import default_pool


def _load_samples(path):
    from reftjax.data.records import DataError, jsonl_objects

    items, texts, lines = [], [], []
    try:
        for lineno, row in jsonl_objects(path):  # (blank lines skipped; bad UTF-8 or JSON named by path:line)
            try:
                item, text = row["item"], row["sample"]["output_text"]
            except (KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{lineno}: expected {{'item': {{...}}, 'sample': "
                                  f"{{'output_text': ...}}}}: {exc!r}") from exc
            if not isinstance(item, dict) or not isinstance(text, str):  # (a number was graded as a grader fault)
                raise ConfigError(f"{path}:{lineno}: expected an object 'item' and a string 'sample.output_text', "
                                  f"got {type(item).__name__} and {type(text).__name__}")
            items.append(item)
            texts.append(text)
            lines.append(lineno)
        if not items:  # (a run printed nothing and exited 0, where the data readers refuse an empty file; review)
            raise ConfigError(f"{path}:0: no samples in the file")
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    return items, texts, lines


def main(argv=None) -> int:
    from reftjax.config import SandboxSettings
    parser = argparse.ArgumentParser(prog="python -m reftjax.graders", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("command", choices=("run", "validate"),
                        help="run: grade every sample (one JSON line each); validate: build and check the grader")
    parser.add_argument("--grader", required=True, help="grader config JSON file")
    parser.add_argument("--samples", help="JSONL of {item, sample} (required for run)")
    parser.add_argument("--timeout-s", type=float, default=2.0,
                        help="sandboxed graders (python, math_equiv, P-CoT programs): wall clock per sample")
    parser.add_argument("--memory-mb", type=int, default=1024, help="sandboxed graders: address space per sample")
    parser.add_argument("--preimport", default="", metavar="M1,M2",
                        help="modules sandboxed programs may import beyond the standard ones, numpy and rapidfuzz")
    args = parser.parse_args(argv)
    try:
        with open(args.grader, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except ValueError as exc:
                raise ConfigError(f"{args.grader}:{getattr(exc, 'lineno', 1)}: invalid JSON: {exc}")
        items, texts, lines = _load_samples(args.samples) if args.samples else ([], [], [])
        try:
            sandbox = SandboxSettings(args.timeout_s, args.memory_mb,
                                      tuple(m.strip() for m in args.preimport.split(",") if m.strip()))
            grader = validate_grader(cfg, pool=default_pool(sandbox.sandbox_config()))
            check_imports(grader)
            check_wordnet(grader)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{args.grader}: {exc}") from exc
        for item, lineno in zip(items, lines):  # a misfit is the samples file's, named by its own line number
            try:
                grader.validate(item)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{args.samples}:{lineno}: grader does not fit this item: {exc}") from exc
        warnings = reach_warnings(grader)
        for line in warnings:
            print(f"warning: {args.grader}: {line}", file=sys.stderr)
        if args.command == "validate":  # (offline: a judge's endpoint is asked by `run`)
            print(json.dumps({"ok": True, "grader": type(grader).__name__,
                              **({"warnings": warnings} if warnings else {})}))
            return 0
        try:
            check_judges(grader)
        except ConfigError as exc:
            raise ConfigError(f"{args.grader}: {exc}") from exc
        if not args.samples:
            raise ConfigError("run needs --samples")
        for i, grade in enumerate(grader.grade_batch(items, texts)):
            print(json.dumps({"index": i, **grade.to_json()}))
        return 0
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
