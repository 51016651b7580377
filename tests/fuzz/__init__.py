"""Seeded fuzzers for everything moerge reads from users (issue 16).

Families (each a generator of cases from ``(family, seed)``, so any case is reproducible alone):

- ``recipe``: recipes in moerge's and mergekit's formats, mutated as data (values of every type and size,
  missing and unknown keys, slices, parameters) and as text (bytes, YAML aliases and bombs, tags, merge
  keys, complex keys, huge numbers), run through :func:`moerge.merge` (planned, and a share merged);
- ``cli``: the same recipes through ``moerge merge`` (in-process, ``click``'s runner);
- ``checkpoint``: model folders with corrupted safetensors headers and bytes, indexes, configs, links
  and FIFOs in place of files, index entries that point out of the folder;
- ``adapter``: PEFT LoRA folders with corrupted configs and factors.

Each case ends in one outcome: ``ok`` (a result, checked against a reference reader when one can read
the inputs: ``ok-verified``), ``error`` (a :class:`moerge.errors.MoergeError`, or a CLI exit status 2),
``internal`` (any other exception: a traceback), ``hang`` (over the time bound; the worker process is
killed), ``crash`` (the worker process died: a signal, a fault), ``outside`` (a file under the campaign's "outside" folder was opened, or its secret appeared in
the output or the message) or ``wrong`` (a result that differs from the reference). The campaign passes
when there are no ``internal``, ``hang``, ``crash``, ``outside`` or ``wrong`` cases.

Run ``python -m tests.fuzz --cases 10000`` for the full campaign (``--help`` for the options); the
default test run holds a fast slice (``tests/fuzz/test_fuzz.py``).
"""
