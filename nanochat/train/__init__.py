"""Training: the trainer loop, its losses, metrics and the sampler it shows progress with.

``python -m nanochat.train`` runs ``nanochat.cli.train.main``.
"""
