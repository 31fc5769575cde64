"""The exceptions the pipeline raises on purpose."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with the inputs or configuration that a user must fix (not a bug)."""


class WorkspaceBusy(PipelineError):
    """Another process holds the workspace lock."""
