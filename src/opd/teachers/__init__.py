"""Teachers turn rollouts into per-token log-probs: the interfaces, a local model, a server, several routed teachers,
and the teacher's own view (template, context, another tokenizer through the chunk estimator)."""
