"""The embedded demo: a synthetic GSM8K-format task, a word-level tokenizer and tiny Qwen3 models."""

DEMO_STEPS = 150  # the demo's optimizer steps, which the README's figures are for
