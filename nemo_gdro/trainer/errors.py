"""Run-time failures the user should see as one line, not a traceback.

The CLI prints these (and :class:`~nemo_gdro.typed_config.ConfigError`,
:class:`CheckpointError`) as ``nemo-gdro train: <message>`` and exits non-zero;
``--debug`` shows the traceback. No torch here: the CLI imports these before it
imports the trainer.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "RunError", "NonFiniteError", "RunLockedError", "RunInterrupted", "CollectiveTimeout"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class RunError(RuntimeError):
    """A failure of the run (not of its configuration), with a message that says what to do.

    ``exit_code``: what the CLI exits with (1 unless a subclass says otherwise).
    """

    exit_code = 1


class NonFiniteError(RunError):
    """A loss, gradient, weight or optimizer state became NaN or infinite."""


class RunLockedError(RunError):
    """Another live process holds the output directory."""


class RunInterrupted(RunError):
    """SIGTERM / SIGINT stopped the run; ``exit_code`` is 128 + the signal number (shell convention)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class CollectiveTimeout(RunError):
    """A collective did not complete within ``parallel.timeout_s`` (a rank stalled or died)."""
