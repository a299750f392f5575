"""mnistlab: the optimizer study of Deep Learning with Python ch. 2 as a tracked, reproducible pipeline."""

__version__ = "0.1.0"
