"""shardline: engine package."""
