"""Who writes a step's completions: the student's batched sampler (KV cache, ℓˢ recorded), the data set's answers,
GKD's mixture of sources."""
