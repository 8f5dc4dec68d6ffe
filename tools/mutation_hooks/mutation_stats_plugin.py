"""pytest plugin of tools/mutation_sample.py's run (-p mutation_stats_plugin): while mutmut collects
which tests reach which function, the functions that child processes of the tests reached
(written by sitecustomize.py beside this file) are filed under each test that ran while they
were written: after the test's teardown, every hits file there is added to the test; the files of
processes that have ended are then removed (a server a module shares counts for each of its
tests). In a parallel run (pytest-xdist, tools/mutation_sample.py's first pass) each worker
has a hits folder of its own and sends the functions its test reached, its own and its child
processes', with the test's teardown report to the controller, where mutmut keeps its record.
Idle in every other pytest run."""
import os

import pytest


def _alive(pid):
    """Whether process pid runs still. An ended one that no one has waited for (a zombie: an
    orphan of a killed test is adopted by tools/mutation_sample.py, which waits for them at the
    end) counts as ended: its hits file would otherwise be filed under every later test."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _stats_run():
    return os.environ.get('MUTANT_UNDER_TEST') == 'stats'


def pytest_configure(config):
    """In a worker of a parallel stats run (pytest-xdist): hits files of its own, so that the
    other worker's tests neither take nor remove them."""
    worker = getattr(config, 'workerinput', {}).get('workerid')
    folder = os.environ.get('MUTATION_HITS_DIR')
    if worker and folder and _stats_run():
        os.environ['MUTATION_HITS_DIR'] = os.path.join(folder, worker)
        os.makedirs(os.environ['MUTATION_HITS_DIR'], exist_ok=True)


def _child_hits():
    """The functions the child processes written into the hits folder have reached; the files of
    processes that have ended are removed."""
    folder, found = os.environ.get('MUTATION_HITS_DIR'), set()
    if not folder or not os.path.isdir(folder):
        return found
    # an xdist worker's own file (sitecustomize.py writes one in every process) is skipped:
    # its in-process hits are taken from mutmut's state, test by test
    own = f'{os.getpid()}.hits'
    for name in os.listdir(folder):
        if not name.endswith('.hits') or name == own:
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                found.update(line.strip() for line in f if line.strip())
        except FileNotFoundError:
            continue
        if not _alive(int(name.split('.')[0])):
            os.remove(path)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # (the test's fixtures, a server among them, have stopped)
    if not _stats_run():
        return
    from mutmut.state import state
    hits = _child_hits()
    if hasattr(item.config, 'workerinput'):
        # a pytest-xdist worker: its own hits too (mutmut's collector runs in the controller
        # only), to the controller with the teardown's report
        hits |= state()._stats
        state()._stats.clear()
        item.user_properties.append(('mutation_hits', sorted(hits)))
        return
    test = item.nodeid.removeprefix('mutants/')
    for function in hits:
        state().tests_by_mangled_function_name[function].add(test)


def pytest_runtest_logreport(report):
    """The controller of a parallel stats run: what mutmut's collector records in a serial run,
    the test's time and the functions it reached, from the workers' reports."""
    if not _stats_run() or not hasattr(report, 'node'):  # (a report from a worker has its node)
        return
    from mutmut.state import state
    test = report.nodeid.removeprefix('mutants/')
    if report.when == 'call':
        state().duration_by_test[test] = state().duration_by_test.get(test, 0.0) + report.duration
    for key, hits in report.user_properties:
        if key == 'mutation_hits':
            for function in hits:
                state().tests_by_mangled_function_name[function].add(test)
