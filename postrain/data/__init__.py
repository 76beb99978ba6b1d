"""Data sources, built-in tasks and formatting."""
