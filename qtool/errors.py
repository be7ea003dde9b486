"""Error types and the exit status each maps to (documented in README)."""

from __future__ import annotations


class QtoolError(Exception):
    """A user-facing error: printed as one line, no traceback."""

    exit_code = 1


class UsageError(QtoolError):
    """Bad flags, bad plan, bad paths: the user must change the command."""

    exit_code = 2


class PlanError(UsageError):
    """A plan file is wrong; the message names file, line and field."""


class ModelError(QtoolError):
    """The input model is missing, corrupt, truncated or unsupported."""

    exit_code = 3


class IndivisibleError(QtoolError):
    """A group size does not divide a layer's input width and the plan says `error`."""

    exit_code = 2


class QualityError(QtoolError):
    """The run finished but its quality gate failed; the artifact is kept."""

    exit_code = 4
