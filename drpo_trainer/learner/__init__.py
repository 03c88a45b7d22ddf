"""The learner: the policy on a DeepSpeed engine, its token log-probs and the packing of
sequences into padding-free micro-batches."""
