"""Labeled images in: where they come from, decoded once, split (stratified, seeded), augmented; the digits set."""
