"""After pre-training: distillation into smaller students and GRPO with rule-checked rewards, each with its own
losses, trainer and run."""
