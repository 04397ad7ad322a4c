"""mocoq: MoCo-style self-supervised pre-training on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
