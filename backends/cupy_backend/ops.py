"""The ops the cupy backend overrides, by reference op name."""
OPS = {}
