"""Errors meant for people, and the one place the command-line tools turn them into a clean exit.

Every problem a user can fix (a wrong path, a text with no mask, a bad flag) raises a subclass of
`MLMError` whose message is one line: what was wrong and what to do. The CLIs print that line and
exit with status 2 for bad input, 1 when the run itself could not go on (a full disk, a rank that
died); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


class MLMError(Exception):
    """Base class: a problem with the user's input or machine, not a bug in mlm."""

    exit_code = 2
    # True: skip the interpreter's teardown after the error line (exit_without_teardown)
    exit_now = False


class CheckpointError(MLMError):
    """A model folder or checkpoint is missing, incomplete, corrupt or does not match the model."""


class UnsupportedModelError(CheckpointError):
    """The folder holds a model family mlm does not implement (e.g. `model_type: "gpt2"`)."""


class TokenizerError(MLMError):
    """No usable tokenizer files, or a tokenizer that does not fit the model."""


class InputError(MLMError):
    """Bad input text or arguments to the API (e.g. fill-mask text without a mask token)."""


class DataError(MLMError):
    """A corpus or prepared dataset that cannot be used (empty, missing, wrong vocabulary)."""


class ConfigError(MLMError):
    """A configuration value or command-line flag that cannot work."""


class StorageError(MLMError):
    """A file could not be written: the disk is full, or the folder is not writable."""

    exit_code = 1


class OutOfMemory(MLMError):
    """Training does not fit in the device's memory, and --micro-batch-size auto could not make it
    fit."""

    exit_code = 1


class DistributedError(MLMError):
    """Another rank died, hung, or did not answer within --dist-timeout."""

    exit_code = 1
    # the lost rank's communication threads may still be running: see exit_without_teardown
    exit_now = True


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with code at once, skipping the interpreter's teardown, after flushing stdout, stderr
    and logging.

    For a process that ran torch.distributed. Gloo's worker threads release each collective's
    tensors after the caller has its result, and a thread may still be doing so when the interpreter
    finalizes. Releasing a tensor whose Python object is gone takes the GIL; a finalizing
    interpreter answers by ending the thread (pthread_exit), and its unwinding through torch's C++
    frames aborts the whole process (SIGABRT, "terminate called without an active exception"; in a
    core dump: ProcessGroupGloo::runLoop, ~AsyncWork, SavedVariable::reset_data, take_gil,
    pthread_exit, std::terminate). The same holds after a rank is lost. Every file was already
    written whole (mlm/io.py), so the teardown has nothing left to do."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def fail(message: str, code: int = 2, now: bool = False) -> NoReturn:
    """Print one line to stderr and exit; used by the CLIs only. Under torchrun every rank says
    which it is. now: skip the interpreter's teardown (exit_without_teardown)."""
    rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    print(f"error{rank}: {message}", file=sys.stderr)
    if now:
        exit_without_teardown(code)
    sys.exit(code)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; user errors become one line on stderr and exit status 2."""
    try:
        main()
    except MLMError as e:
        fail(str(e), e.exit_code, now=e.exit_now)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
