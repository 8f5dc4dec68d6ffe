"""Suite-wide pytest settings: the `cuda` marker. Tests marked so need a CUDA device and skip
cleanly without one (CI); `python -m benchmarks.gpu OUT_DIR` runs them first on a GPU machine.

The mutation check (test_mutants.py) runs last, and takes the tests that guard it as passing
unmutated where they passed earlier in the same session (PASSED), instead of running them all
once more in its copy of the project.

A suite started in the background by a script (`sh test.sh &`: the shell sets SIGINT to be
ignored) would hand that on to every program the tests start, and each Ctrl-C test would fail
for no fault of the code: the suite takes SIGINT back (a handler is reset to the default in a
program it starts; an ignored signal stays ignored)."""
import signal

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PASSED = set()  # node ids ('tests/test_x.py::name[param]') of the tests passed in this session
FAILED = set()  # ... and of those that failed (or erred)


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


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.startswith('tests/test_mutants.py'))  # (stable)


def pytest_runtest_logreport(report):
    if report.when == 'call' and report.passed:
        PASSED.add(report.nodeid)
    elif report.failed:
        FAILED.add(report.nodeid)
