"""The training job: data -> LoRA/QLoRA -> eval -> merge -> versioned artifacts.

Importing this package must stay cheap: no torch, no Kubernetes client.
"""
__version__ = "0.1.0"
