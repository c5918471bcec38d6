"""`python -m experiments`: the runnable experiments and this host's allocator setting."""
import json
import os
import pkgutil

import experiments

if __name__ == "__main__":
    names = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if not m.name.startswith("_"))
    print(json.dumps({"experiments": [f"python -m experiments.{n}" for n in names],
                      "host_allocator": experiments.HOST_ALLOCATOR,
                      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "pid": os.getpid()}))
