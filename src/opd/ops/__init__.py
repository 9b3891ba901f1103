"""Operations on tensors that every layer above shares: the step's batch type, forward passes, log-prob math, FLOP
counts. Nothing here knows a model's config, a teacher or a trainer."""
