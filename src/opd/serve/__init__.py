"""`opd serve-teacher`: the HTTP layer (server.py) and the batched scoring behind it (scoring.py)."""
