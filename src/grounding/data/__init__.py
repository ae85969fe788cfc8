"""Datasets: format readers that yield neutral records, the tables built from them, and the
pair, split and sample steps on those tables."""
