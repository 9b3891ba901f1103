"""Task-specific answer checking."""
