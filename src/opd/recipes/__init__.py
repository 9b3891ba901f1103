"""Helpers that prepare the inputs of the example recipes in examples/."""
