"""embtables: memory-efficient embedding tables for recommender systems on TorchRec."""

__version__ = "0.1.0"
