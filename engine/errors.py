"""The user-facing error types, at the bottom of the import graph (this module imports nothing).

A `TesseraError` means: the run as requested cannot go on because of something outside the code -- a
YAML file or override, a data file, a tokenizer, a checkpoint, the file system, a numerical fault of the
run. Its message is meant for the user: it names the thing, what was expected and what was found, and the
CLI prints it as one line (no traceback unless `--debug` or TESSERA_DEBUG=1) and exits with the class's
`exit_code`. Everything else -- a bug -- is a different type and keeps its traceback.

Exit codes (documented in docs/reliability.md and `tessera --help`):
    2 configuration   3 data   4 tokenizer   5 checkpoint   6 run directory / file system
    7 numerical fault (too many bad steps)   8 a peer rank died or a collective timed out
    75 stopped early with a checkpoint (SIGTERM/SIGUSR1/SIGINT or checkpoint.time_limit; resume with
       checkpoint.load=auto)   130 interrupted (SIGINT)   143 terminated (SIGTERM)

The data-layer errors (SourceError, IndexedDatasetError, DatasetBuildError) and TokenizerError derive
from these, and stay ValueErrors, so existing `except ValueError` callers keep working.
"""


class TesseraError(Exception):
    """A problem the user can act on; the message says what, where, expected and found."""

    exit_code = 1


class ConfigError(TesseraError, ValueError):
    """A configuration problem, with a message meant for the user."""

    exit_code = 2


class DataError(TesseraError, ValueError):
    """A data file (raw text/jsonl, .bin/.idx, meta.json, index cache) is missing, corrupt or inconsistent."""

    exit_code = 3


class TokenizerProblem(TesseraError, ValueError):
    """A tokenizer cannot be loaded, or does not match the data or the model."""

    exit_code = 4


class CheckpointError(TesseraError, ValueError):
    """A checkpoint or weights file is missing, incomplete or does not match the model."""

    exit_code = 5


class ConversionError(CheckpointError):
    """A Hugging Face model cannot be converted exactly (an architecture or a config field the model does not
    implement, a missing shard, a tensor of the wrong shape), or a conversion failed its --verify check."""


class RunDirError(TesseraError):
    """The run directory cannot be used (not a Tessera run, locked by another run, not writable)."""

    exit_code = 6


class NumericalFault(TesseraError):
    """Training stopped on non-finite or spiking losses / gradient norms."""

    exit_code = 7


class PeerFailure(TesseraError):
    """Another rank died, or a collective did not finish within the process-group timeout."""

    exit_code = 8


class RunStopped(TesseraError):
    """Not a failure: the run stopped early on request (a signal or the time limit) after saving a
    checkpoint, and can be resumed from it."""

    exit_code = 75  # EX_TEMPFAIL: try again (requeue)


EXIT_STOPPED = RunStopped.exit_code
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

__all__ = ["CheckpointError", "ConfigError", "ConversionError", "DataError", "EXIT_INTERRUPTED", "EXIT_STOPPED", "EXIT_TERMINATED",
           "NumericalFault", "PeerFailure", "RunDirError", "RunStopped", "TesseraError", "TokenizerProblem"]
