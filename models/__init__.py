"""lipcert models: the 1-Lipschitz convolutions, the Standard baseline and the LipNet family."""

from models import layers as _layers  # noqa: F401  (registers the methods)
from models.network import SIZES, LipNet, list_sizes
from models.registry import create_layer, create_model, layer_class, list_methods, register_method

__all__ = [
    "SIZES", "LipNet", "create_layer", "create_model", "layer_class", "list_methods", "list_sizes",
    "register_method",
]
