"""Every entry point runs in the project's environment (.venv): the shell scripts set it up with
tools/venv.sh, and a python entry point run by a python without the packages says which python to use
in one line instead of a ModuleNotFoundError traceback; a missing module of the project keeps
its traceback. Every entry point ends alike (lib.command): a bad value is one line and exit code 2,
SIGTERM stops it as Ctrl-C does (exit code 130)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import group, make_batches

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON3 = '''#!/bin/sh
# a system python3 without the packages; `-m venv DIR` makes a venv whose python echoes its arguments
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\\necho "venv python $*"\\n' > "$3/bin/python"
    chmod +x "$3/bin/python"
    exit 0
fi
echo "system python3 $*"
exit 1
'''


@pytest.mark.parametrize('args', [['train.py'], ['train_2gpu.py'], ['validate_performance.py'],
                                  ['serve.py'], ['plot.py', 'w'], ['-m', 'preprocessing.make_data'],
                                  ['-m', 'preprocessing.make_demo_data'], ['pretrained/convert.py']])
def test_a_python_without_the_packages_is_told_which_python_to_use(args):
    # -S: no site-packages at all (as a system python3 without them); -E: nor PYTHONPATH
    proc = subprocess.run([sys.executable, '-S', '-E', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert lines[0].startswith(f'error: {sys.executable} has no module ') and 'requirements.txt' in lines[0]
    assert str(REPO / '.venv' / 'bin' / 'python') in lines[0] and 'sh tools/venv.sh' in lines[0]


@pytest.mark.parametrize('args, says', [
    (['train.py', 'n_ephocs=3'], "unknown config key 'n_ephocs' in command-line overrides"),
    (['train_2gpu.py', 'exchange_freq=0'], "'exchange_freq' in command-line overrides must be at least 1"),
    (['validate_performance.py', 'checkpoint={tmp}/none.pt'], 'no snapshot {tmp}/none.pt'),
    (['serve.py', '{tmp}/none.pt'], 'no snapshot {tmp}/none.pt'),
    (['plot.py', '{tmp}'], 'neither history.csv nor val_record.npy in {tmp}'),
    (['-m', 'preprocessing.make_data', '{tmp}/none.yaml'], 'cannot read paths file {tmp}/none.yaml'),
    (['-m', 'preprocessing.make_demo_data', '{tmp}/file/raw'], 'cannot write the demo data to {tmp}/file/raw'),
    (['pretrained/convert.py', 'export', '{tmp}/none.pt', '{tmp}/out', '1'], 'no snapshot {tmp}/none.pt'),
    (['-m', 'benchmarks.exchange', '--device', 'tpu'], "--device: 'tpu' is not a device"),
    (['-m', 'benchmarks.shared_draws', '--device', 'tpu'], "--device: 'tpu' is not a device")])
def test_every_entry_point_says_a_bad_value_in_one_line_and_exits_2(tmp_path, args, says):
    (tmp_path / 'file').write_text('')
    proc = subprocess.run([sys.executable, *(a.format(tmp=tmp_path) for a in args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr
    assert proc.stderr.startswith('error: ') and says.format(tmp=tmp_path) in proc.stderr, proc.stderr


def test_a_bug_keeps_its_traceback_and_a_user_error_names_its_process(capsys):
    from lib import UserError, command

    def fail(error):
        raise error
    with pytest.raises(ZeroDivisionError):  # a bug: not caught
        command(fail)(ZeroDivisionError('x'))
    assert command(fail, who='worker 1: ')(UserError('bad\n value')) == 2
    assert capsys.readouterr().err == 'worker 1: error: bad value\n'  # one line, its process named
    assert command(fail, interrupted=None)(KeyboardInterrupt()) == 130 and not capsys.readouterr().err
    assert command(lambda: None)() == 0 and command(lambda: 3)() == 3


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path):
    """`kill PID` (SIGTERM) to train.py in the middle of an epoch: `interrupted`, exit code 130, no
    traceback. (train_2gpu.py's launcher: test_train_2gpu.py; under torchrun its agent's SIGTERM
    ends a rank at once.)"""
    keys = make_batches(str(tmp_path / 'data'), n_train=300, n_val=2, batch=8, size=36)
    values = dict(keys, model='alexnet_cifar', crop_size=32, gpu='cpu', n_epochs=50, print_freq=1,
                  weights_dir=str(tmp_path / 'w'))
    proc = subprocess.Popen([sys.executable, 'train.py'] + [f'{k}={v}' for k, v in values.items()],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith('epoch 1 iter'):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.strip().splitlines()[-1:] == ['interrupted'], err
    assert 'Traceback' not in err


def test_a_missing_module_of_the_project_keeps_its_traceback(tmp_path):
    """Only packages from outside the project get the one line: a bug (a module of lib/ that is not
    there) is reported as usual."""
    script = tmp_path / 'entry.py'
    script.write_text(f'import sys\nsys.path.insert(0, {str(REPO)!r})\nimport lib.env\n'
                      'import lib.no_such_module\n')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and 'Traceback' in proc.stderr and 'lib.no_such_module' in proc.stderr


def test_generate_data_runs_in_the_venv_it_sets_up(tmp_path):
    """Without .venv, generate_data.sh (and generate_toy_data.sh through it) makes it as demo.sh does,
    rather than running the system python3 that lacks the packages."""
    repo = tmp_path / 'repo'
    for name in ('preprocessing/generate_data.sh', 'preprocessing/generate_toy_data.sh', 'tools/venv.sh',
                 'requirements.txt'):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'python3').write_text(FAKE_PYTHON3)
    (tmp_path / 'bin' / 'python3').chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path / "bin"}:/usr/bin:/bin')
    proc = subprocess.run(['sh', str(repo / 'preprocessing' / 'generate_toy_data.sh'), 'my.yaml'], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and 'system python3' not in proc.stdout, proc.stdout + proc.stderr
    assert f'venv python -m preprocessing.make_data {tmp_path / "my.yaml"} --toy' in proc.stdout, proc.stdout
    assert (repo / '.venv' / '.installed-requirements.txt').exists()


LOGGING_PYTHON3 = '''#!/bin/sh
# a system python3 whose `-m venv DIR` makes a venv python that logs its arguments; `pip show
# torch` there succeeds once a `pip install` named torch
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    cat > "$3/bin/python" <<'END'
#!/bin/sh
here=$(dirname "$0")
echo "$*" >> "$here/log"
case "$*" in
    "-m pip show"*) test -f "$here/has-torch" ;;
    *torch==*) touch "$here/has-torch" ;;
esac
END
    chmod +x "$3/bin/python"
    exit 0
fi
exit 1
'''


def test_torch_index_url_installs_the_pinned_torch_from_that_index_first(tmp_path):
    """TORCH_INDEX_URL (e.g. PyTorch's CPU-only builds) takes the pinned torch from that index
    before the requirements (whose pin it then satisfies), once; another index replaces the build
    in the venv (pip would call it satisfied); unset, pip is asked for the requirements alone."""
    repo = tmp_path / 'repo'
    for name in ('tools/venv.sh', 'requirements.txt', 'requirements-test.txt'):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'python3').write_text(LOGGING_PYTHON3)
    (tmp_path / 'bin' / 'python3').chmod(0o755)
    pin = next(line for line in (REPO / 'requirements.txt').read_text().splitlines()
               if line.startswith('torch=='))
    log, req, test_req = repo / '.venv' / 'bin' / 'log', repo / 'requirements.txt', repo / 'requirements-test.txt'
    pip = '-m pip install --disable-pip-version-check -q'
    cpu, cuda = 'https://download.pytorch.org/whl/cpu', 'https://download.pytorch.org/whl/cu128'
    calls = []
    for url, file, want in (
            (cpu, req, ['-m pip show -q torch', f'{pip} {pin} --index-url {cpu}', f'{pip} -r {req}']),
            (cpu, req, []),                                     # up to date: pip not run
            (cpu, test_req, [f'{pip} -r {test_req}']),          # torch is there already
            (None, req, []),
            (cuda, req, ['-m pip show -q torch',
                         f'{pip} --force-reinstall --no-deps {pin} --index-url {cuda}'])):
        env = {k: v for k, v in os.environ.items() if k != 'TORCH_INDEX_URL'}
        env.update(PATH=f'{tmp_path / "bin"}:/usr/bin:/bin', **({'TORCH_INDEX_URL': url} if url else {}))
        proc = subprocess.run(['sh', str(repo / 'tools' / 'venv.sh'), file.name],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        done = log.read_text().splitlines() if log.exists() else []
        assert done[len(calls):] == want, (url, file.name, done)
        calls = done


def test_every_shell_entry_point_uses_the_venv():
    """No shell script runs a bare python3 except tools/venv.sh, which makes .venv with it."""
    scripts = [p for d in ('', 'preprocessing', 'tools', 'benchmarks', 'recipes') for p in (REPO / d).glob('*.sh')
               if p != REPO / 'tools' / 'venv.sh']
    assert len(scripts) >= 4
    for script in scripts:
        code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith('#')]
        assert not any(re.search(r'(?<![/\w.-])python3?\b', line) for line in code), script
        if any('python' in line for line in code):
            assert any('tools/venv.sh' in line for line in code), script


def test_test_sh_runs_the_tests_it_is_given_or_else_all():
    """`sh test.sh tests/test_lint.py` (docs/testing.md's way to run one file) runs that file
    alone; other arguments (-k ...) still go to pytest over the whole of tests/. The mutation
    check runs in a second pass, after the rest (tools/suite.py)."""
    def passes(*args):
        proc = subprocess.run(['sh', 'test.sh', '--collect-only', '-q', *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        found = []
        for line in proc.stdout.splitlines():
            if line.startswith('[tests] pytest '):
                found.append(set())
            elif '::' in line:
                found[-1].add(line.split('::')[0])
        return found
    assert passes('tests/test_lint.py') == [{'tests/test_lint.py'}]
    assert passes('tests/test_mutants.py::test_docs_name_tests_that_exist') == [{'tests/test_mutants.py'}]
    first, second = passes('-k', 'lint or optim or docs_name')
    assert first >= {'tests/test_lint.py', 'tests/test_optim.py'} and second == {'tests/test_mutants.py'}
    assert 'tests/test_mutants.py' not in first


def test_the_tests_passed_in_the_first_pass_reach_the_mutation_check_in_the_second(tmp_path):
    """tools/suite.py's record: the controller of a run of two workers writes every worker's
    passes and failures to TESTS_RECORD_OUT (a variable no test sees), and tests/conftest.py
    takes them as passed in this session where TESTS_RECORD_IN names that file."""
    record = tmp_path / 'record.json'
    probe = tmp_path / 'test_probe.py'
    probe.write_text('import os\n\n'
                     'def test_sees_no_record():\n    assert "TESTS_RECORD_OUT" not in os.environ\n\n'
                     'def test_fails():\n    assert False\n')
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-n', '2',
                        'tests/test_optim.py', str(probe), f'--rootdir={REPO}'], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TESTS_RECORD_OUT=str(record)))
    assert r.returncode == 1 and '1 failed, 7 passed' in r.stdout, r.stdout[-2000:]
    done = json.loads(record.read_text())
    optim = [t for t in done['passed'] if t.startswith('tests/test_optim.py::')]
    assert len(optim) >= 5 and any(t.endswith('::test_sees_no_record') for t in done['passed'])
    assert [t.split('::')[1] for t in done['failed']] == ['test_fails']
    check = ('import sys\nfrom tests.conftest import passed\n'
             f'print(passed("{optim[0]}"), passed("tests/test_optim.py::test_none"))')
    for env, want in (({'TESTS_RECORD_IN': str(record)}, 'True False'), ({}, 'False False')):
        r = subprocess.run([sys.executable, '-c', check], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, **env))
        assert r.stdout.split() == want.split(), r.stdout + r.stderr


def test_ctrl_c_stops_the_test_command_as_it_stops_pytest():
    """Ctrl-C in the terminal (SIGINT to the foreground process group) while `sh test.sh` runs
    tests two at a time: pytest stops its workers and reports, and the command ends with pytest's
    exit code for an interrupted run (2), without a traceback of tools/suite.py and without the
    mutation check, leaving nothing running."""
    proc = subprocess.Popen(['sh', 'test.sh', '-q', 'tests/test_loader.py', '-k', 'stalled_loader'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # tools/suite.py (test.sh's exec), pytest, its two workers, and the test's loader process
        while len(group(proc.pid)) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 2 and 'Traceback' not in err, out[-2000:] + err[-2000:]
    assert 'KeyboardInterrupt' in out and 'mutation check' in out, out[-2000:]
    deadline = time.monotonic() + 10
    while group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group(proc.pid)
