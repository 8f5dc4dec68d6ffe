"""A pytest run per request, each in a fresh fork of one process that has imported the third-party
packages once: the mutation check (test_mutants.py) runs its ~75 short pytest runs through it,
instead of paying a new interpreter's start and `import torch` (about 2.5 s on 2 cores) for each.

Started in the project's copy (`python tests/forkserver.py`, cwd the copy), it imports nothing of the
project: each fork imports the project's modules afresh from the files as they are then (mutated).
A fork is as `python -m pytest ARGS` started in the copy would be: its own session (process group),
stdin /dev/null, stdout and stderr to files, default signal handlers, `__main__` pytest's.

Protocol, one JSON object a line: in {"args": [...], "out": PATH, "err": PATH, "timeout": S};
out {"rc": CODE}, or {"rc": null} when the run outlived its timeout. After each run, whatever is
left of its process group is killed (a mutant may leave processes behind)."""
import json
import os
import signal
import sys
import time
import warnings

import h5py  # noqa: F401  the packages the tests and the project import, once
import hickle  # noqa: F401
import numpy  # noqa: F401
import PIL.Image  # noqa: F401
import pytest
import pytest.__main__
import torch  # noqa: F401
import yaml  # noqa: F401
import zmq  # noqa: F401


def child(request):
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request['out']), (2, request['err'])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [pytest.__main__.__file__, *request['args']]
    sys.modules['__main__'] = pytest.__main__  # what a process it spawns re-imports, as under -m
    rc = 3
    try:
        rc = int(pytest.main(request['args']))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def serve():
    warnings.filterwarnings('ignore', message='.*fork.*', category=DeprecationWarning)
    sys.path[0] = os.getcwd()  # the copy's modules, as `python -m pytest` run there finds them
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        deadline, rc = time.monotonic() + request['timeout'], None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if rc is None:
            os.waitpid(pid, 0)
        print(json.dumps({'rc': rc}), flush=True)


if __name__ == '__main__':
    serve()
