"""Training: the run configuration, the trainer and its losses, the optimizer, checkpoints, the loop, and the
shared setup of every run kind."""
