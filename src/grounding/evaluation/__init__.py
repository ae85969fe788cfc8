"""Scores (the protocol's metrics), the report stage's tables and texts, and figures."""
