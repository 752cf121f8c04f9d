"""Tests of the OpenAI-compatible HTTP server and the `shardline` command line."""
