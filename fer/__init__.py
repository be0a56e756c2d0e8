"""fer: facial expression recognition with Lightning, timm, Hydra and TensorBoard."""

from fer.labels import CLASSES, NUM_CLASSES

__all__ = ["CLASSES", "NUM_CLASSES"]
__version__ = "0.1.0"
