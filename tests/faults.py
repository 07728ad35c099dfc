"""Fault injection for tests (installed in test processes by tests/fault_site).

Not product code. `poison`: the search raises for any batch holding a patch whose id contains
'poison', as a bug or a bad input that slipped past validation would. `kill_on_call`: the
process dies at a chosen call, as a driver lost to the OOM killer would.
"""

from __future__ import annotations


def poison(search_module) -> None:
    real = search_module.latent_search

    def latent_search(generator, discriminator, x, patch_ids, cfg, encoder=None):
        if any("poison" in pid for pid in patch_ids):
            raise RuntimeError("injected fault")
        return real(generator, discriminator, x, patch_ids, cfg, encoder)

    search_module.latent_search = latent_search


def kill_on_call(module, function: str, n: int) -> None:
    """SIGKILL this process when module.function is called the n-th time (before it runs)."""
    import os
    import signal

    real = getattr(module, function)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, function, wrapper)
