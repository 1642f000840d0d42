"""Datasets the project generates itself (so demos and tests need no download)."""
