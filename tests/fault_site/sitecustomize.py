"""Installed in every process of a test Ray cluster through PYTHONPATH (see test_cluster.py).

When ANOGAN_TEST_POISON is set, `anogan_batch.search` is patched right after it is imported so
that a batch holding a patch id with 'poison' in it raises, as a bug would. A runtime_env
setup hook would do the same but makes every Ray worker start through the runtime-env agent,
which triples the test's time on a 2-core machine.
"""

import importlib.abc
import importlib.util
import os
import sys


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "anogan_batch.search":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from tests.faults import poison

            poison(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("ANOGAN_TEST_POISON"):
    sys.meta_path.insert(0, _PatchOnImport())
