"""Pure loss functions of tensors (losses.py), and one objective object per `loss.kind` that says what it needs from
the teacher (kinds.py)."""
