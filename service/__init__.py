"""The BentoML service. Imports no torch."""
