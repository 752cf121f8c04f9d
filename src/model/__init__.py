"""shardline: model package."""
