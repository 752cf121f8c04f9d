"""shardline: transport package."""
