"""One file per method; importing this package registers them all."""

from models.layers import aol, standard  # noqa: F401
