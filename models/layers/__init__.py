"""One file per method; importing this package registers them all."""

from models.layers import aoc, aol, bcop, bro, cayley, cpl, lot, sandwich, sll, soc, standard  # noqa: F401
