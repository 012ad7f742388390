"""Example handlers for `jlm worker` (run from the repository root)."""
