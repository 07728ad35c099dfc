"""Fault injection for cluster tests (installed in Ray workers by tests/fault_site).

Not product code: the search raises for any batch holding a patch whose id contains 'poison',
as a bug or a bad input that slipped past validation would.
"""

from __future__ import annotations


def poison(search_module) -> None:
    real = search_module.latent_search

    def latent_search(generator, discriminator, x, patch_ids, cfg, encoder=None):
        if any("poison" in pid for pid in patch_ids):
            raise RuntimeError("injected fault")
        return real(generator, discriminator, x, patch_ids, cfg, encoder)

    search_module.latent_search = latent_search
