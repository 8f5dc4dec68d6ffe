"""Suite-wide pytest settings: the `cuda` marker. Tests marked so need a CUDA device and skip
cleanly without one (CI); `python -m benchmarks.gpu OUT_DIR` runs them first on a GPU machine.

The mutation check (test_mutants.py) runs last, and takes the tests that guard it as passing
unmutated where they passed earlier in the same session (PASSED), instead of running them all
once more in its copy of the project. test.sh runs it in a pytest run of its own after the other
tests (tools/suite.py), and a file carries the tests passed (and failed) from the one to the
other: written as the first ends, to TESTS_RECORD_OUT, by the process that collects the reports
(with pytest-xdist, the controller, which gets every worker's; the variable is taken out of the
environment before any worker or test starts), and read as the second starts, from
TESTS_RECORD_IN.

A suite started in the background by a script (`sh test.sh &`: the shell sets SIGINT to be
ignored) would hand that on to every program the tests start, and each Ctrl-C test would fail
for no fault of the code: the suite takes SIGINT back (a handler is reset to the default in a
program it starts; an ignored signal stays ignored)."""
import json
import os
import signal

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PASSED = set()  # node ids ('tests/test_x.py::name[param]') of the tests passed in this session
FAILED = set()  # ... and of those that failed (or erred)
RECORD_OUT = os.environ.pop('TESTS_RECORD_OUT', None)
if os.environ.get('TESTS_RECORD_IN'):
    with open(os.environ['TESTS_RECORD_IN']) as f:
        _record = json.load(f)
    PASSED.update(_record['passed'])
    FAILED.update(_record['failed'])


def passed(test):
    """Whether `test` (a node id; a parametrized test's name alone: all of its cases) passed in
    this session."""
    if test in PASSED:
        return True
    cases = [t for t in PASSED | FAILED if t.startswith(test + '[')]
    return bool(cases) and not FAILED.intersection(cases)


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device (skipped without one); run on a '
                                       'GPU machine by python -m benchmarks.gpu')


# The files of a minute or more on 2 cores, slowest first: test.sh hands whole files to its two
# workers in collection order (pytest-xdist's --dist loadfile), and they end together when the
# long ones are not left for last.
SLOW_FILES = ['test_cluster.py', 'test_train_2gpu.py', 'test_exact.py', 'test_torchrun.py',
              'test_benchmark_gpu.py', 'test_loader.py']


def pytest_collection_modifyitems(config, items):
    def order(item):
        name = item.nodeid.split('::')[0].rsplit('/', 1)[-1]
        return (name == 'test_mutants.py',
                SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES))
    items.sort(key=order)  # (stable: each file's tests in their order)


def pytest_runtest_logreport(report):
    if report.when == 'call' and report.passed:
        PASSED.add(report.nodeid)
    elif report.failed:
        FAILED.add(report.nodeid)


def pytest_sessionfinish(session):
    if RECORD_OUT:
        with open(RECORD_OUT, 'w') as f:
            json.dump({'passed': sorted(PASSED), 'failed': sorted(FAILED)}, f)
