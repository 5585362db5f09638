"""Errors that reach the user as one clear paragraph instead of a stack trace."""


class TfosError(Exception):
    """A problem the user can fix; the message says what went wrong and how to fix it."""


class JobFailed(TfosError):
    """Training ran but ended in an error on a worker or in Spark."""
