"""Drift detection: pure statistics over model outputs (softmax vectors, embeddings, predicted-class counts)."""
