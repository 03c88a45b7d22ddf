"""drpo-trainer: RL of LLMs on verifiable math with the DRPO objective.

Light on import: heavy libraries (transformers, deepspeed, vllm) load only in the modules
that need them, so `import drpo_trainer.algorithms.losses` pulls in torch and nothing else.
"""

__version__ = "0.1.0"
