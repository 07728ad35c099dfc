"""Installed in test processes through PYTHONPATH (see test_cluster.py, test_crash.py).

- ANOGAN_TEST_POISON: `anogan_batch.core.search` is patched right after it is imported so that a
  batch holding a patch id with 'poison' in it raises, as a bug would.
- ANOGAN_TEST_KILL=module:function:N: the process SIGKILLs itself on the N-th call of
  module.function, as a driver lost to the OOM killer or a preempted node would be.

A runtime_env setup hook would do the same but makes every Ray worker start through the
runtime-env agent, which triples the test's time on a 2-core machine.
"""

import importlib.abc
import importlib.util
import os
import sys


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _poison(module):
    from tests.faults import poison

    poison(module)


def _killer(function, n):
    def patch(module):
        from tests.faults import kill_on_call

        kill_on_call(module, function, n)

    return patch


if os.environ.get("ANOGAN_TEST_POISON"):
    sys.meta_path.insert(0, _PatchOnImport("anogan_batch.core.search", _poison))
if os.environ.get("ANOGAN_TEST_KILL"):
    _module, _function, _n = os.environ["ANOGAN_TEST_KILL"].split(":")
    sys.meta_path.insert(0, _PatchOnImport(_module, _killer(_function, int(_n))))
