"""pytest plugin of tools/mutation_sample.py's run (-p mutation_stats_plugin): while mutmut collects
which tests reach which function, the functions that child processes of the tests reached
(written by sitecustomize.py beside this file) are filed under each test that ran while they
were written: after the test's teardown, every hits file there is added to the test; the files of
processes that have ended are then removed (a server a module shares counts for each of its
tests). Idle in every other pytest run."""
import os

import pytest


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # (the test's fixtures, a server among them, have stopped)
    folder = os.environ.get('MUTATION_HITS_DIR')
    if os.environ.get('MUTANT_UNDER_TEST') != 'stats' or not folder or not os.path.isdir(folder):
        return
    from mutmut.state import state
    test = item.nodeid.removeprefix('mutants/')
    for name in os.listdir(folder):
        if not name.endswith('.hits'):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                hits = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            continue
        for function in hits:
            state().tests_by_mangled_function_name[function].add(test)
        if not _alive(int(name.split('.')[0])):
            os.remove(path)
