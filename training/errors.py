"""The training room's one exception type."""


class TrainingError(Exception):
    """A training/data/config problem the user can fix; the message says how."""
