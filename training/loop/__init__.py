"""The fine-tuning loop (fit), the rules it applies (steps), what an epoch is fed (batches), torchrun (distributed)."""
