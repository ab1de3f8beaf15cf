"""Files: GGUF, checkpoints (safetensors + JSON) and the atomic-write helper they share."""
