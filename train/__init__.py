"""Ray Train + DeepSpeed: train a tier on a dataset version, evaluate it, register it."""
