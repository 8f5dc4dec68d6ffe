"""A systematic mutation pass by sample: mutmut (pinned in requirements-mutation.txt) over lib/,
preprocessing/ and the entry points, on a fixed-seed sample of its mutants, each held to its
quickest tests. Not part of the test command (its time on 2 cores: docs/testing.md);
tests/test_mutants.py is the curated check that is.

    sh tools/venv.sh requirements-mutation.txt
    .venv/bin/python -m tools.mutation_sample                  # 300 mutants, seed 27
    .venv/bin/python -m tools.mutation_sample --survivors      # again, only the last run's survivors
    .venv/bin/python -m tools.mutation_sample --unfinished     # only those without a result yet
    .venv/bin/python -m tools.mutation_sample --budget 0 --mutants NAME  # every test that reaches it
    .venv/bin/python -m tools.mutation_sample --sample 50 --seed 1 --workdir /tmp/m

What it does:
 1. copies the project (the files git tracks or would add) into WORKDIR/repo and writes mutmut's
    config there (setup.cfg): mutate TARGETS, test with the test files of TESTS;
 2. has mutmut write every mutant of TARGETS (one changed operator, constant, string, argument ...
    per mutant, each inside one function), and draws SAMPLE of them: those whose names hash
    lowest with SEED. The same code gives the same sample, and a change to a function redraws
    only that function's mutants (mutmut numbers them anew);
 3. `mutmut run` on those: mutmut first runs TESTS once, on --jobs workers (pytest-xdist),
    recording which tests reach which function (tools/mutation_hooks/ adds what the tests' child
    processes, e.g. `python train.py`, reach), then runs for each mutant only the tests that reach
    its function, quickest first, as many as fit in --budget seconds (by their times in the first
    pass; at least one), stopping at the first failure (killed) or passing them all (survived): a
    mutant of a function that every training run reaches would otherwise run most of the suite,
    minutes each, when it survives. The survivors that ran only part of their tests then run
    again with more of them, within --recheck seconds;
 4. prints per module the sampled, killed and surviving mutants, each survivor with its place
    (file:line), its mutation and its verdict from docs/mutation-triage.tsv (a missing test that
    is now written: `test`; a mutant no test can tell from the original: `equivalent`; one that
    only a GPU can show: `cuda`; one that survived its quickest tests and that a slower one,
    named, catches: `slower`), and the survivors without a verdict (a verdict recorded for
    another mutation of the same name, its function changed since, is named and not counted);
    WORKDIR/results.json holds it all. Survival counts the mutants that survived or found no
    test, less the `equivalent`, `cuda` and `slower` ones (a timeout or a crash counts as caught).

WORKDIR (default: <temp dir>/alexnet-mutation) is kept: a rerun reuses mutmut's record of which
tests reach what (mutmut reruns what changed) unless --fresh. Leftover processes of a mutant's
tests (a killed test's `python train.py`) are ended when the run ends.
"""
import argparse
import ast
import csv
import ctypes
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from lib import ROOT, UserError, command

TARGETS = ['lib/', 'preprocessing/', 'train.py', 'train_2gpu.py', 'validate_performance.py',
           'serve.py', 'plot.py']
# The tests mutmut runs. Left out: test_mutants.py (the curated check, itself a mutation run),
# test_lint.py and test_docs.py (they read the project's files, which mutmut rewrites),
# test_environment.py (a python without site-packages cannot import the mutated files' mutmut),
# test_cluster.py and test_serve_browser.py (network namespaces, a browser: minutes each),
# test_exact.py (the launchers over the 227 px alexnet: minutes; the draws it relies on have unit
# tests in test_data.py and test_model.py, and test_train_2gpu.py / test_torchrun.py compare runs),
# test_cuda.py (skipped without a GPU), the benchmark tests (benchmarks/ is not mutated).
TESTS = ['tests/test_archives.py', 'tests/test_config.py', 'tests/test_data.py',
         'tests/test_evaluate.py', 'tests/test_host_feed.py', 'tests/test_link.py',
         'tests/test_loader.py', 'tests/test_model.py', 'tests/test_optim.py',
         'tests/test_precision.py', 'tests/test_preprocessing.py', 'tests/test_pretrained.py',
         'tests/test_serve.py', 'tests/test_torchrun.py', 'tests/test_train.py',
         'tests/test_train_2gpu.py']
# Not mutated: lib/env.py runs before any package is imported, to name a python that lacks them
# (tests/test_environment.py runs it with python -S), and a mutated file imports mutmut first.
NOT_MUTATED = ['lib/env.py']
TRIAGE = os.path.join(ROOT, 'docs', 'mutation-triage.tsv')
TRIAGE_FIELDS = ('mutant', 'where', 'mutation', 'verdict', 'reason')
VERDICTS = ('test', 'equivalent', 'cuda', 'slower')
MUTMUT_VERSION = '3.8.1'


def project_files():
    r = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                       cwd=ROOT, capture_output=True, check=True)
    return [n for n in r.stdout.decode().split('\0') if n and os.path.isfile(os.path.join(ROOT, n))]


def copy_project(repo):
    """The project's files into repo (changed ones only: a file whose bytes are the same keeps its
    mtime, so mutmut does not regenerate its mutants)."""
    for name in project_files():
        src, dst = os.path.join(ROOT, name), os.path.join(repo, name)
        if os.path.exists(dst):
            with open(src, 'rb') as a, open(dst, 'rb') as b:
                if a.read() == b.read():
                    continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)


def write_config(repo, debug=False):
    tops = sorted({n.split('/')[0] for n in project_files()} - {t.rstrip('/') for t in TARGETS})
    lines = ['[mutmut]', 'source_paths =', *[f'    {t}' for t in TARGETS],
             'also_copy =', *[f'    {t}' for t in tops],
             'do_not_mutate =', *[f'    {t}' for t in NOT_MUTATED],
             'pytest_add_cli_args_test_selection =', *[f'    {t}' for t in TESTS],
             # per-test limit (pytest-timeout: a mutant that hangs a test is caught in 5 min, not
             # in mutmut's 15 x the tests' time), and the hits of the tests' child processes
             'pytest_add_cli_args =', '    -p', '    mutation_stats_plugin', '    --timeout=300',
             '    -p', '    no:cacheprovider',
             # each mutant forked from the process that ran the tests once (OMP_NUM_THREADS=1:
             # torch's CPU kernels start no thread pool, so the fork is safe), fastest tests first
             'process_isolation = fork',
             # a mutant's tests time out (caught) after 4 x (their time in the first pass + 10 s):
             # a mutant that hangs costs a minute or two, not mutmut's 15 x; 2 mutants at once on
             # 2 cores take 2-3 x their first-pass time
             'timeout_multiplier = 4', 'timeout_constant = 10',
             f'debug = {str(debug).lower()}', '']
    with open(os.path.join(repo, 'setup.cfg'), 'w') as f:
        f.write('\n'.join(lines))


def environment(workdir, repo):
    hits = os.path.join(workdir, 'hits')
    os.makedirs(hits, exist_ok=True)
    hooks = os.path.join(repo, 'tools', 'mutation_hooks')
    path = os.pathsep.join([hooks] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
    return dict(os.environ, PYTHONPATH=path, MUTATION_HITS_DIR=hits, MUTATION_ROOT=repo,
                OMP_NUM_THREADS='1')


# `mutmut run`, less its run of the unmutated tests when the stats run just before ran them all
# (and they passed): on 2 cores that is the ten minutes of a second pass over TESTS; and with a
# budget, each mutant held to its quickest tests (by their time in the first pass) while their
# sum stays within it (at least one), each such cut recorded as a line of RECORD.
# The first pass runs on JOBS workers (pytest-xdist, whole test files each, the slowest first:
# tests/conftest.py), mutation_stats_plugin.py carrying each test's hits to mutmut's record (this
# process still imports the tests before the mutants' forks, in mutmut's forced-fail run).
# argv: after-stats|full|again, budget in seconds (0: no budget), RECORD, JOBS, mutmut run's
# arguments (again: mutants tested before in this run, their tests then passed unmutated)
MUTMUT_RUN = """
import json
import sys
import mutmut.__main__ as m
from mutmut.runners import harness
from mutmut.state import state
from mutmut.workers import isolation
mode, budget, record, jobs = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if mode in ('after-stats', 'again'):
    isolation.ForkRunner.run_clean_tests = lambda self, tests: 0
run_stats = harness.PytestRunner.run_stats
def parallel_stats(self, *, tests):
    serial = self._pytest_args_regular_run
    if jobs > 1:
        self._pytest_args_regular_run = lambda t: serial(t) + ['-n', str(jobs), '--dist', 'loadfile']
    try:
        return run_stats(self, tests=tests)
    finally:
        self._pytest_args_regular_run = serial
harness.PytestRunner.run_stats = parallel_stats
submit = isolation.ForkRunner.submit
def quickest(self, mutant, tests, cpu_limit, estimated):
    from math import ceil
    from mutmut.configuration import config
    took = state().duration_by_test
    kept, total = [], 0.0
    for t in sorted(tests, key=lambda t: took[t]):
        if budget and kept and total + took[t] > budget:
            break
        kept.append(t)
        total += took[t]
    with open(record, 'a') as f:
        f.write(json.dumps(dict(mutant=mutant, ran=len(kept), of=len(tests), seconds=total,
                                all_seconds=estimated)) + '\\n')
    cfg = config()  # the time limits of the tests kept, as mutmut computes them
    return submit(self, mutant, kept, ceil((total + cfg.timeout_constant) * cfg.timeout_multiplier * 2), total)
isolation.ForkRunner.submit = quickest
m.cli(['run', *sys.argv[5:]])
"""


def check_mutmut():
    try:
        from importlib.metadata import version
        have = version('mutmut')
    except Exception:  # noqa: BLE001  (PackageNotFoundError, or no metadata at all)
        have = None
    if have != MUTMUT_VERSION:
        raise UserError(f'{sys.executable} has mutmut {have or "not installed"}, this script is written '
                 f'for {MUTMUT_VERSION}: run `sh tools/venv.sh requirements-mutation.txt` first')


def become_subreaper():
    """Orphans of the run (a test's child whose test was killed) become this process's children,
    so that they can be ended at the end (Linux; elsewhere they are left to their own timeouts)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def end_leftovers(pgid):
    """End what is left of the run: its process group, then any orphan adopted by this process."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    me = str(os.getpid())
    for pid in os.listdir('/proc') if os.path.isdir('/proc') else ():
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[1] == me:
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, IndexError):
            continue
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def run(cmd, repo, env, log):
    """cmd in repo, in a session of its own, output appended to log; returns its exit status."""
    with open(log, 'a') as out:
        out.write(f'\n$ {" ".join(cmd[:4])}{" ..." if len(cmd) > 4 else ""}\n')
        out.flush()
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait()
        finally:
            end_leftovers(proc.pid)


def mutmut_run(mode, budget, mutants, args, workdir, repo, env, log):
    rc = run([sys.executable, '-c', MUTMUT_RUN, mode, str(budget), os.path.join(workdir, RECORD),
              str(args.jobs), '--max-children', str(args.jobs), *mutants], repo, env, log)
    if rc:
        raise UserError(f'mutmut run ended with exit status {rc} (see {log})')


def generate(repo, env, log):
    code = ('import mutmut.__main__ as m\n'
            'm.copy_src_dir(); m.copy_also_copy_files(); m.setup_source_paths()\n'
            'print(m.create_mutants(2))\n')
    if run([sys.executable, '-c', code], repo, env, log):
        raise UserError(f'mutmut could not write the mutants (see {log})')


def link_venv(repo):
    """The tests' shell scripts (generate_data.sh, demo.sh) run the project's .venv/bin/python:
    in the copy and in mutmut's mutants/ folder, .venv is the python running this."""
    for folder in (repo, os.path.join(repo, 'mutants')):
        link = os.path.join(folder, '.venv')
        if os.path.islink(link):
            os.remove(link)
        elif os.path.isdir(link):
            shutil.rmtree(link)
        os.symlink(sys.prefix, link)


def all_mutants(repo):
    """{mutant name: exit code or None} of every mutant mutmut wrote (its .meta files)."""
    found = {}
    for t in TARGETS:
        base = os.path.join(repo, 'mutants', t)
        metas = ([base + '.meta'] if t.endswith('.py') else
                 [os.path.join(d, n) for d, _, names in os.walk(base) for n in names if n.endswith('.meta')])
        for meta in metas:
            with open(meta) as f:
                found.update(json.load(f)['exit_code_by_key'])
    return found


def draw(names, size, seed):
    """The `size` mutants whose names hash lowest with the seed: a change to one function
    redraws only its own mutants, the rest of the sample stays (a random.sample of the list
    would redraw every one when the list's length changes)."""
    def key(name):
        return hashlib.sha256(f'{seed}:{name}'.encode()).digest()
    return sorted(sorted(names, key=key)[:size])


def module_of(name):
    """lib.checkpoint.x_epochs__mutmut_3 -> lib/checkpoint.py; lib.x_command__mutmut_1 ->
    lib/__init__.py"""
    parts = name.split('.')
    for i, p in enumerate(parts):
        if p.startswith('x_') or p.startswith('x\u01c1'):
            path = '/'.join(parts[:i])
            return f'{path}/__init__.py' if os.path.isdir(os.path.join(ROOT, path)) else f'{path}.py'
    raise ValueError(name)


def describe(repo, name):
    """(file:line, mutation) of a mutant: the first line it changes, as `old -> new`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key
    path = module_of(name)
    here = os.getcwd()
    os.chdir(repo)
    try:
        diff = get_diff_for_mutant(name, path=path).splitlines()
    finally:
        os.chdir(here)
    old = [line[1:] for line in diff if line.startswith('-') and not line.startswith('---')]
    new = [line[1:] for line in diff if line.startswith('+') and not line.startswith('+++')]
    # the changed line's place: its offset from the def line in the diff's function, plus
    # the def line of that function in the file
    func, cls = orig_function_and_class_names_from_key(name)
    lineno = None
    hunk = next((line for line in diff if line.startswith('@@')), None)
    if hunk and old:
        start = int(hunk.split()[1].split(',')[0][1:])
        body = diff[diff.index(hunk) + 1:]
        offset = next(i for i, line in enumerate(b for b in body if not b.startswith('+'))
                      if line.startswith('-'))
        changed = start + offset  # 1-based line in the function's printed source
        with open(os.path.join(repo, path)) as f:
            tree = ast.parse(f.read())
        scope = tree.body
        if cls:
            scope = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == func), None)
        if node is not None:
            lineno = node.lineno + changed - 1 - leading_lines(repo, name, path)
    mutation = ' / '.join(' '.join(s.split()) for s in old) + ' -> ' + ' / '.join(' '.join(s.split()) for s in new)
    return f'{path}:{lineno or "?"}', mutation


def leading_lines(repo, name, path):
    """Lines of the printed function before its def line (comments above it)."""
    from mutmut.mutation.diff_apply import read_functions_from_index
    import libcst as cst
    here = os.getcwd()
    os.chdir(repo)
    try:
        orig, _ = read_functions_from_index(name, path)
    finally:
        os.chdir(here)
    code = cst.Module([orig]).code.strip().splitlines()
    return next(i for i, line in enumerate(code) if line.lstrip().startswith(('def ', 'async def ')))


def status_of(code):
    from mutmut.stats import status_by_exit_code
    return status_by_exit_code[code]


def read_triage():
    if not os.path.exists(TRIAGE):
        return {}
    with open(TRIAGE, newline='') as f:
        rows = [r for r in csv.DictReader((line for line in f if not line.startswith('#')), delimiter='\t',
                                         quoting=csv.QUOTE_NONE)]
    for r in rows:
        if r['verdict'] not in VERDICTS:
            raise UserError(f"{TRIAGE}: {r['mutant']}: verdict {r['verdict']!r} (one of {', '.join(VERDICTS)})")
    return {r['mutant']: r for r in rows}


SURVIVED = ('survived', 'no tests')   # (a timeout or a crash counts as caught)
BUDGET = 5.0
RECHECK = 30.0
RECORD = 'tests-run.jsonl'  # in WORKDIR: per mutant tested, how many of its tests it ran


def read_record(workdir):
    """{mutant: its last test's line of RECORD}"""
    path, found = os.path.join(workdir, RECORD), {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                found[r['mutant']] = r
    return found


def same_mutation(recorded, now):
    """Whether a verdict's recorded `old -> new` (shortened by hand, maybe: `...` for a part left
    out) names the mutation `now`: each recorded part of the old line is in its old line, and each
    of the new in its new line."""
    def parts(text):
        return [p.strip() for p in text.replace(' / ', '...').split('...') if p.strip()]
    if ' -> ' not in recorded or ' -> ' not in now:
        return recorded == now
    (r_old, r_new), (n_old, n_new) = recorded.split(' -> ', 1), now.split(' -> ', 1)
    return all(p in n_old for p in parts(r_old)) and all(p in n_new for p in parts(r_new))


def report(repo, sample, codes, triage, record, seconds, args):
    rows, per_module, stale = [], {}, []
    keys = ('sampled', 'killed', 'survived', 'excused', 'slower')
    for name in sample:
        status = status_of(codes.get(name))
        where, mutation = describe(repo, name) if status in SURVIVED or name in triage else ('', '')
        verdict = triage.get(name, {}).get('verdict', '')
        if verdict and not same_mutation(triage[name]['mutation'], mutation):
            # mutmut numbers a function's mutants anew when the function changes: this name's
            # verdict was given to another mutation
            stale.append(f"  {name}: triaged as `{triage[name]['mutation']}`, now `{mutation}`")
            verdict = ''
        ran = record.get(name)
        cut = bool(ran) and ran['ran'] < ran['of']  # held to its quickest tests
        rows.append(dict(mutant=name, status=status, where=where, mutation=mutation, verdict=verdict,
                         reason=triage[name]['reason'] if verdict else '',
                         tests=f"{ran['ran']} of {ran['of']}" if ran else '', cut=cut))
        m = per_module.setdefault(module_of(name), dict.fromkeys(keys, 0))
        m['sampled'] += 1
        if status in SURVIVED:
            m['survived'] += 1
            m['excused'] += verdict in ('equivalent', 'cuda')
            m['slower'] += verdict == 'slower' and cut
        else:
            m['killed'] += 1
    total = {k: sum(m[k] for m in per_module.values()) for k in keys}
    print(f'\n{total["sampled"]} sampled mutants (seed {args.seed}) in {seconds / 60:.1f} min on '
          f'{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, '
          f'mutmut {MUTMUT_VERSION}, each held to its quickest tests within '
          f'{f"{args.budget:g} s" if args.budget else "no budget"}\n')
    print('| module | sampled | killed | survived | of them equivalent or CUDA-only | '
          'caught by a test past the budget | survival rate (less those) |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for mod, m in sorted(per_module.items()) + [('all', total)]:
        rate = (m['survived'] - m['excused'] - m['slower']) / m['sampled']
        print(f'| {mod} | {m["sampled"]} | {m["killed"]} | {m["survived"]} | {m["excused"]} | '
              f'{m["slower"]} | {100 * rate:.1f} % |')
    survivors = [r for r in rows if r['status'] in SURVIVED]
    print(f'\nsurvivors ({len(survivors)}):')
    for r in survivors:
        ran = f", its quickest {r['tests']} tests" if r['cut'] else ''
        print(f"  {r['mutant']}  {r['where']}  [{r['status']}{ran}]  {r['mutation']}  "
              f"-> {r['verdict'] or 'NOT TRIAGED'}{': ' + r['reason'] if r['reason'] else ''}")
    if stale:
        print(f'\n{len(stale)} verdict(s) of {os.path.relpath(TRIAGE, ROOT)} given to another mutation of '
              'the same name (its function has changed since), not counted:\n' + '\n'.join(stale))
    missed = [r for r in rows if r['verdict'] == 'test' and r['status'] in SURVIVED]
    if missed:
        print(f'\n{len(missed)} triaged `test` but survived: their test does not catch them')
    whole = [r for r in survivors if r['verdict'] == 'slower' and not r['cut']]
    if whole:
        print(f'\n{len(whole)} triaged `slower` but survived every test that reaches them: '
              f'{" ".join(r["mutant"] for r in whole)}')
    untriaged = [r for r in survivors if not r['verdict'] or r in whole]
    print(f'\n{len(untriaged)} survivor(s) without a verdict in {os.path.relpath(TRIAGE, ROOT)}')
    return rows, per_module, total, untriaged


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog='.venv/bin/python -m tools.mutation_sample',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('--sample', type=int, default=300, help='mutants drawn (default 300)')
    p.add_argument('--seed', type=int, default=27, help='seed of the draw (default 27)')
    p.add_argument('--jobs', type=int, default=os.cpu_count() or 2, help='mutants tested at once')
    p.add_argument('--budget', type=float, default=BUDGET,
                   help='seconds of tests (by their time in the first pass) a mutant runs at most, '
                        f'its quickest first (default {BUDGET:g}; 0: every test that reaches it)')
    p.add_argument('--recheck', type=float, default=RECHECK,
                   help='then the survivors that ran only part of their tests again, within this many '
                        f'seconds (default {RECHECK:g}; not more than --budget: no second round)')
    p.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'alexnet-mutation'))
    p.add_argument('--fresh', action='store_true', help='start from a new copy (no recorded stats)')
    p.add_argument('--survivors', action='store_true',
                   help="test again only the mutants that survived in the workdir's last run")
    p.add_argument('--unfinished', action='store_true',
                   help='test only the mutants of the sample without a result yet (a run cut short, '
                        'or files changed since)')
    p.add_argument('--mutants', nargs='*', help='test these mutant names instead of a sample')
    p.add_argument('--debug', action='store_true', help="mutmut's debug output (every test's) in the log")
    args = p.parse_args(argv)
    # Ctrl-C stops the run; and the tests' programs must get it too (a test sends SIGINT): a
    # disposition of SIG_IGN (this started in the background by a shell) would pass to them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    check_mutmut()
    workdir = os.path.abspath(args.workdir)
    repo = os.path.join(workdir, 'repo')
    if args.fresh and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    os.makedirs(repo, exist_ok=True)
    log = os.path.join(workdir, 'mutmut.log')
    started = time.monotonic()
    become_subreaper()
    copy_project(repo)
    write_config(repo, args.debug)
    env = environment(workdir, repo)
    print(f'[mutation] copy in {repo}; mutmut output in {log}', flush=True)
    generate(repo, env, log)
    link_venv(repo)
    names = all_mutants(repo)
    sample = draw(names, args.sample, args.seed)
    results_file = os.path.join(workdir, 'results.json')
    todo = sample
    if args.mutants:
        todo = sample = sorted(args.mutants)
    elif args.unfinished:
        todo = [n for n in sample if names.get(n) is None]
    elif args.survivors:
        with open(results_file) as f:
            last = json.load(f)
        todo = [r['mutant'] for r in last['rows'] if r['status'] in SURVIVED and r['mutant'] in names]
    print(f'[mutation] {len(names)} mutants in {", ".join(TARGETS)}; testing {len(todo)} '
          f'(seed {args.seed}, {args.jobs} at once)', flush=True)
    if todo:
        fresh = not os.path.exists(os.path.join(repo, 'mutants', 'mutmut-stats.json'))
        mutmut_run('after-stats' if fresh else 'full', args.budget, todo, args, workdir, repo, env, log)
        # the survivors held to part of their tests: again, with more of them
        record, codes = read_record(workdir), all_mutants(repo)
        again = [n for n in todo if status_of(codes.get(n)) in SURVIVED and n in record
                 and record[n]['ran'] < record[n]['of']]
        if again and args.recheck > args.budget:
            print(f'[mutation] {len(again)} survivors ran only their quickest tests: again within '
                  f'{args.recheck:g} s', flush=True)
            mutmut_run('again', args.recheck, again, args, workdir, repo, env, log)
    codes = all_mutants(repo)
    rows, per_module, total, untriaged = report(repo, sample, codes, read_triage(), read_record(workdir),
                                                time.monotonic() - started, args)
    with open(results_file, 'w') as f:
        json.dump(dict(date=datetime.date.today().isoformat(), seed=args.seed, sample=args.sample,
                       seconds=time.monotonic() - started, cores=os.cpu_count(), rows=rows,
                       per_module=per_module, total=total), f, indent=1)
    print(f'[mutation] results in {results_file}')
    return 1 if untriaged else 0


if __name__ == '__main__':
    sys.exit(main())
