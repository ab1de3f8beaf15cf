"""Data: the corpus and its token shards, the tokenizer and the batch loaders.

``python -m nanochat.data`` builds the token cache (``nanochat.data.corpus.main``).
"""
