"""The HH data pipeline: load and split (hh), tokenize (tokenize), batch (batches), prompts and synthetic data."""
