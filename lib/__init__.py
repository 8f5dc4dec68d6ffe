"""The library behind train.py, train_2gpu.py, validate_performance.py and serve.py, and what every
part of the project shares: the repository's root, the shared-memory folder, UserError and the
way every command ends (`command`). Standard library only: the entry points import this before
they know that the project's packages are installed (lib/env.py)."""
import functools
import os
import signal
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# Where private folders of shared buffers and sockets go (the loader's slots, train_2gpu.py's
# link and shm exchange): shared memory, or where there is none, None: tempfile's folder
# (mkdtemp(dir=SHM)).
SHM = '/dev/shm' if os.path.isdir('/dev/shm') else None


class UserError(Exception):
    """Something the user can fix (a config value, a data or snapshot file, a peer worker that
    stopped): the message is one line naming it. Every entry point runs in `command`, which
    prints `error: <message>` without a traceback; anything else is a bug and keeps its traceback."""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def command(main=None, *, who='', interrupted='interrupted', sigterm=True):
    """Decorates an entry point's main(...) so that it ends as every command of the project does,
    with its exit code: what main returns (None: 0); a UserError, one line `<who>error: <message>`
    on stderr and 2; Ctrl-C (and with sigterm, SIGTERM: `kill` stops as cleanly), the line
    `interrupted` (None: no line) and 130; anything else is a bug and keeps its traceback.
    @command, @command(who=...), or command(fn, ...)(args)."""
    if main is None:
        return functools.partial(command, who=who, interrupted=interrupted, sigterm=sigterm)

    @functools.wraps(main)
    def run(*args, **kwargs):
        own = sigterm and threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGTERM, _interrupt) if own else None
        try:
            return main(*args, **kwargs) or 0
        except UserError as e:
            print(f'{who}error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            if interrupted:
                print(interrupted, file=sys.stderr, flush=True)
            return 130
        finally:
            if own:  # (None: a handler not set from Python; SIGTERM's default then)
                signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
    return run
