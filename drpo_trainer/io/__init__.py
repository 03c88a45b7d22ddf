"""What a run reads and writes: prompts, checkpoints (and resuming them at another process count),
the exported model, metrics and W&B, sampled completions, and plots."""
