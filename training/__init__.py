"""Data, backbones, the fine-tuning engine, evaluation. Importing this package loads no torch."""
