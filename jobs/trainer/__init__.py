"""The trainer: everything that needs torch, transformers or peft (docs/architecture.md).

It sits beside the light contract (the other modules of ``jobs``), imports it freely, and is imported by
nothing in the contract or in the launcher. ``python -m jobs`` (jobs/__main__.py) starts it.
"""
