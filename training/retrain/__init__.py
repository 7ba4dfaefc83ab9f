"""The loop's back half: drift-gated, lock-guarded retraining with champion/challenger promotion."""
