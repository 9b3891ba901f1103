"""Loading Hugging Face models and tokenizers with the early checks, precision and device choices, LoRA adapters."""
