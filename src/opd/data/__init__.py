"""Rows from JSONL or the hub, prompt encoding through chat templates, the reproducible prompt stream; tasks/ holds
answer checkers."""
