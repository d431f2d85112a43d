"""Training loop pieces: data loading, optimisation and checkpoints for adapter training."""
