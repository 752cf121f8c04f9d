"""Helpers shared by the test packages (tiny models, leak checks, free ports)."""
