"""Parallel layers and collectives."""
