"""Reports over finished runs: collect results folders, write comparison tables and plots."""
