"""The types every layer shares: the normalised edit case, its probes and the score kinds. Imports nothing of the project."""
