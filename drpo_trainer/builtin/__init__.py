"""What ships inside the package besides the trainer: the embedded default model `builtin:tiny-math`
(`tiny_model`: tokenizer, tiny Qwen3, supervised warm start, cache, CLI) and the synthetic
arithmetic task it learns (`arithmetic`). The training loop only calls `resolve_model_path`.
"""
