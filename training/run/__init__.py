"""The run directory: its files and how to read them, writing it, publishing it as a registry version."""
