"""Task-specific answer checking (GSM8K's `#### N`)."""
