"""The test command's two passes (test.sh runs this, after setting up .venv):

 1. the tests, two files at a time (pytest-xdist, a process each, taking whole files in turn:
    module fixtures are made once; tests/conftest.py puts the slowest files first): a test waits
    on processes, sockets and timeouts a good part of its time, and two fill 2 cores better;
 2. the mutation check (tests/test_mutants.py), two mutants at a time (each worker with a copy
    of the project of its own), once the tests it relies on have passed: it takes those that
    passed in pass 1 as passing unmutated (a record that tests/conftest.py writes and reads)
    instead of running them again.

Arguments go to pytest in both passes; tests named (`tests/test_x.py`, `tests/test_x.py::name`)
run in the pass they belong to, and a pass with none of its tests named is left out. `-n 0`
runs one test at a time. Exit status: pytest's (5 where no test at all was selected)."""
import os
import subprocess
import sys
import tempfile

MUTANTS = 'tests/test_mutants.py'
WORKERS = '2'
TAKES_VALUE = {'-k', '-m', '-p', '-n', '--numprocesses', '--dist', '--deselect', '--ignore', '--ignore-glob',
               '--durations', '--maxfail', '--timeout', '--rootdir', '-c', '--junitxml', '-o'}


def split(argv):
    """(tests named outside the mutation check, tests named in it, the other arguments)"""
    tests, mutants, options, value = [], [], [], False
    for a in argv:
        if value or not (a == 'tests' or a.startswith('tests/')):
            options.append(a)
            value = not value and a in TAKES_VALUE
        elif a.split('::')[0] == MUTANTS:
            mutants.append(a)
        else:
            tests.append(a)
    return tests, mutants, options


def pytest(args, **env):
    print(f'[tests] pytest {" ".join(args)}', flush=True)
    proc = subprocess.Popen([sys.executable, '-m', 'pytest', *args], env=dict(os.environ, **env))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached pytest too: it stops its workers and reports
        return proc.wait()


def main(argv):
    tests, mutants, options = split(argv)
    whole = not tests and not mutants or 'tests' in tests
    fd, record = tempfile.mkstemp(prefix='alexnet-tests-', suffix='.json')
    os.close(fd)
    common = ['-n', WORKERS, '--timeout=900']
    try:
        codes = []
        if whole or tests:
            paths = ['tests'] if whole else tests
            codes.append(pytest([*paths, f'--ignore={MUTANTS}', '--dist', 'loadfile', *common, *options],
                                TESTS_RECORD_OUT=record))
            if codes[-1] not in (0, 5):
                print(f'[tests] the mutation check ({MUTANTS}) is left out: tests failed',
                      flush=True)
                return codes[-1]
        if whole or mutants:
            codes.append(pytest([*(mutants or [MUTANTS]), '--dist', 'load', *common, *options],
                                TESTS_RECORD_IN=record if os.path.getsize(record) else ''))
        failed = [c for c in codes if c not in (0, 5)]
        return failed[0] if failed else 0 if 0 in codes else 5
    finally:
        os.remove(record)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
