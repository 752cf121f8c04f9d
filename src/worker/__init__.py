"""shardline: worker package."""
