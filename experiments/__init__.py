"""Runnable experiments: `python -m experiments.<name> --help`.

Started that way, the process first re-executes itself once with glibc's
transparent-huge-page tunable for malloc (`reftjax/host.py`: XLA:CPU's per-step
temporaries would otherwise be page-faulted in 4 KiB at a time every step).
Imported from a notebook or another program, nothing happens here: set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before that interpreter starts instead.
Opt out with `REFTJAX_HOST_ALLOCATOR=system`. Started that way too, transformers is
told torch is not installed (`reftjax.host.keep_torch_out`: it would import it, ~2.5 s,
for nothing reftjax runs; `REFTJAX_IMPORT_TORCH=1` keeps it).
"""
from reftjax.host import host_allocator_mode, keep_torch_out, started_as_module, use_hugepage_malloc

if started_as_module(__name__):
    HOST_ALLOCATOR = use_hugepage_malloc()
    keep_torch_out()
else:
    HOST_ALLOCATOR = host_allocator_mode()
