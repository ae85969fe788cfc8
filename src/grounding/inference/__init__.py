"""Grounding phrases in new images with a trained grounder, in process or served by MLflow."""
