"""`python -m experiments`: the runnable experiments and this host's allocator setting."""
import json
import os
import pathlib
import pkgutil
import sys

import experiments

if __name__ == "__main__":
    if sys.argv[1:]:  # (--help printed the JSON; review, session 30)
        asked = sys.argv[1:] in (["-h"], ["--help"])
        print("usage: python -m experiments  (no arguments): one JSON line, the runnable experiments and this host's "
              "allocator setting; each experiment has its own --help", file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    here = pathlib.Path(experiments.__path__[0])
    # runnable: modules with a __main__ block (arithmetic_task is a library of the arithmetic experiments)
    names = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_")
                   and '__name__ == "__main__"' in (here / f"{m.name}.py").read_text())
    print(json.dumps({"experiments": [f"python -m experiments.{n}" for n in names],
                      "host_allocator": experiments.HOST_ALLOCATOR,
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "pid": os.getpid()}))
