"""Runnable experiments: `python -m experiments.<name> --help`.

Importing the package first keeps freed host memory mapped for XLA:CPU (glibc
`mallopt`, see `reftjax/host.py`): it must happen before numpy or JAX start
their threads, and `python -m experiments.<name>` imports this file first.
Opt out with `REFTJAX_HOST_ALLOCATOR=system`.
"""
from reftjax.host import tune_cpu_allocator

HOST_ALLOCATOR_TUNED = tune_cpu_allocator()
