"""The loop (trainer.py) and what it calls: setup, the micro-batched update, metrics, evaluation, the collapse guard,
the memory plan."""
