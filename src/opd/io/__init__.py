"""What a run writes and reads back: atomic checkpoints, Hugging Face exports, metric sinks, reports, the progress
bar."""
