"""Datasets the trainer reads."""
