"""One file per method; importing this package registers them all."""

from models.layers import aol, bcop, cayley, cpl, lot, sll, soc, standard  # noqa: F401
