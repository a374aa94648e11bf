"""The error a training run stops with when the user can act on it (the message says what and what to do)."""


class TrainingError(RuntimeError):
    """A run stopped for a reason the user can act on (the message says what and what to do)."""
