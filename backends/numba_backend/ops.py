"""The ops the numba backend overrides, by reference op name."""
OPS = {}
