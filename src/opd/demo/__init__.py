"""The embedded demo: a synthetic GSM8K-format task, a word-level tokenizer and tiny Qwen3 models."""
