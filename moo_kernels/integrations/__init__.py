"""Adapters that put moo_kernels inside real trainers.

Each submodule imports its trainer library on import, so import the one you use:

    from moo_kernels.integrations.trl import MooGRPOConfig, MooGRPOTrainer   # TRL
    from moo_kernels.integrations import verl as moo_verl; moo_verl.register()  # verl

The versions they are tested against are pinned in pyproject.toml's "integrations" extra.
"""
