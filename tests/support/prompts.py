"""Prompts shared by the end-to-end tests and benchmarks."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "A haiku about autumn:\n",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
]
MAX_TOKENS = 20
