"""Reports: benchmarks and figures that print a table and write JSON and PNG (the scripts call these)."""
