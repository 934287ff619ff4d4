"""Training: settings, the one loop, pretraining, fine-tuning, time budgets, torchrun."""
