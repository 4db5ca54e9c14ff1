"""semssl: self-supervised visual pre-training with semantically consistent positives."""

__version__ = "0.1.0"
