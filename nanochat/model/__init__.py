"""The model: one parameter table and one forward for training, evaluation, prefill and decode."""
