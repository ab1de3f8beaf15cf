"""Inference: the engine (loading, caches, prefix reuse and rewind), sampling and text streaming."""
