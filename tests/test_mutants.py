"""The mutation check: each guarantee docs/testing.md calls tested is broken on purpose, one line at a time,
in a copy of the project, and the tests that guard it must then fail.

A mutant that survives (its tests still pass) fails here: the guarantee has no test that bites.
A mutation whose line is no longer in the source fails too, so the list follows the code: when a
guarded line changes, update its mutant. A new guarantee in docs/testing.md comes with its mutant here.
Run alone:  sh test.sh tests/test_mutants.py -v
"""
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {'.git', '.venv', '.whl', 'data', 'weights', '__pycache__', '.pytest_cache'}


@dataclass(frozen=True)
class Mutant:
    name: str        # the guarantee it breaks
    path: str        # file, relative to the repo root
    line: str        # text found exactly once in that file ...
    mutated: str     # ... and what it becomes
    tests: tuple     # pytest node ids (relative to the repo root) of which one must fail


T2 = 'tests/test_train_2gpu.py::'
MUTANTS = [
    # --- the two-worker link (lib/link.py) and exchange (lib/exchange.py)
    Mutant('CURVE switched off between hosts', 'lib/link.py',
           '        if curve_dir:\n            self._curve(curve_dir)',
           '        if False:\n            self._curve(curve_dir)',
           ('tests/test_link.py::test_curve_encrypts_everything_on_the_wire',
            'tests/test_link.py::test_curve_refuses_clients_without_the_right_key',
            'tests/test_link.py::test_worker1_refuses_a_server_that_cannot_prove_the_secret')),
    Mutant("other users may enter the launcher's folder (the link's socket)", 'train_2gpu.py',
           "run_dir = tempfile.mkdtemp(prefix='alexnet-2gpu-', dir=shm_root)  # mode 0700",
           "run_dir = tempfile.mkdtemp(prefix='alexnet-2gpu-', dir=shm_root); os.chmod(run_dir, 0o755)",
           (T2 + 'test_hostile_clients_are_rejected_and_training_goes_on',)),
    Mutant('worker 0 reads messages of clients other than worker 1', 'lib/link.py',
           'if ident != self.peer_id:', 'if False:',
           (T2 + 'test_hostile_clients_are_rejected_and_training_goes_on',)),
    Mutant('worker 0 takes any hello as worker 1', 'lib/link.py',
           'if (kind, rank, len(parts)) != (HELLO, self.peer, 2):', 'if kind != HELLO:',
           ('tests/test_link.py::test_worker0_drops_clients_that_are_not_worker1_and_waits_for_it',)),
    Mutant('a worker that fails sends no BYE', 'lib/link.py',
           'if reason is not None and self.peer_id is not None:', 'if False:',
           (T2 + 'test_a_worker_that_fails_tells_the_other_which_names_it',)),
    Mutant('exchange_freq ignored: exchange after every step', 'lib/exchange.py',
           'if self.pending >= self.freq:', 'if True:',
           (T2 + 'test_exchange_every_k_steps_and_at_the_end_of_an_epoch',)),
    Mutant('no exchange at the end of an epoch', 'lib/exchange.py',
           '    def flush(self):\n        if self.pending:', '    def flush(self):\n        if False:',
           (T2 + 'test_exchange_every_k_steps_and_at_the_end_of_an_epoch',)),
    Mutant('each worker keeps its own half: averages only what it owns', 'lib/exchange.py',
           '                p.copy_(m)\n', '                pass\n',
           (T2 + 'test_exchange_every_k_steps_and_at_the_end_of_an_epoch',)),
    Mutant('tcp exchange: the averaged half is not sent back', 'lib/exchange.py',
           'self.link.recv(link.DATA, seq, into=host[a:b])',
           'self.link.recv(link.DATA, seq, into=host[a:b].copy())',
           (T2 + 'test_exchange_every_k_steps_and_at_the_end_of_an_epoch',)),
    # --- the training loop (lib/trainer.py)
    Mutant('worker 1 ignores the snapshot on resume', 'lib/trainer.py',
           "self.model.load_state_dict(state['model'])",
           "self.exchanger.rank or self.model.load_state_dict(state['model'])",
           ('tests/test_torchrun.py::test_ranks_resume_two_plus_two_epochs_as_four[gradients]',)),
    Mutant('a resume does not restore the momentum and lr', 'lib/trainer.py',
           'self.opt.load_state_dict(state)', 'pass',
           ('tests/test_train.py::test_two_plus_two_epochs_equal_four_bitwise',)),
    Mutant('a resume does not restore the random streams', 'lib/trainer.py',
           "checkpoint.set_rng_state(state['rng'], self.gen, self.device, self.order_gen)", 'pass',
           ('tests/test_train.py::test_two_plus_two_epochs_equal_four_bitwise',)),
    Mutant('another learning_rate silently ignored', 'lib/training.py',
           "if saved.get('learning_rate', cfg['learning_rate']) != cfg['learning_rate']:", 'if False:',
           ('tests/test_train.py::test_a_resume_refuses_the_keys_its_snapshot_overrides_and_one_with_'
            'nothing_to_train_writes_nothing',)),
    Mutant('top-5 computed as top-1', 'lib/trainer.py',
           '(top5 != y[:, None]).all(1)', '(top5[:, :1] != y[:, None]).all(1)',
           ('tests/test_evaluate.py::test_top1_top5_and_loss_against_a_hand_computation',)),
    Mutant('autocast switched off', 'lib/trainer.py',
           "enabled=precision in ('bf16', 'fp16')", 'enabled=False',
           ('tests/test_precision.py::test_the_forward_runs_in_the_precision_asked_for',)),
    Mutant('label smoothing ignored', 'lib/trainer.py',
           "label_smoothing=cfg['label_smoothing']", 'label_smoothing=0.0',
           ('tests/test_evaluate.py::test_cosine_run_logs_the_scheduled_lr_and_label_smoothing_changes_the_loss',)),
    Mutant('the file order is not shared by the workers', 'lib/trainer.py',
           "self.order_gen = torch.Generator().manual_seed(cfg['seed'] + ORDER_SEED)",
           "self.order_gen = torch.Generator().manual_seed(cfg['seed'] + ORDER_SEED + exchanger.rank)",
           ('tests/test_torchrun.py::test_n_ranks_equal_one_worker[2-average-0]',)),
    # --- the optimiser (lib/optim.py)
    Mutant('biases at the weights\' learning rate', 'lib/optim.py',
           '([i for i, w in enumerate(is_weight) if not w], 2.0, 0.0)',
           '([i for i, w in enumerate(is_weight) if not w], 1.0, 0.0)',
           ('tests/test_optim.py::test_two_steps_match_a_hand_computation',)),
    Mutant('no weight decay', 'lib/optim.py',
           'torch._foreach_add_(grads, params, alpha=decay)', 'pass',
           ('tests/test_optim.py::test_two_steps_match_a_hand_computation',)),
    # --- torchrun (train.py)
    Mutant("train.py does not name a dead rank (traceback instead)", 'train.py',
           "if not (isinstance(e, dist.DistError) or 'gloo' in str(e).lower()):", 'if True:',
           ('tests/test_torchrun.py::test_train_py_names_a_dead_rank_itself',)),
    # --- data (lib/data.py) and the loader process (lib/loader.py)
    Mutant('mirrored crops take the unmirrored mean', 'lib/data.py',
           'm = mean_flip[:, y0:y0 + c, W - x0 - c:W - x0]', 'm = mean[:, y0:y0 + c, x0:x0 + c]',
           ('tests/test_data.py::test_crop_mirror_matches_the_reference_bitwise',)),
    Mutant('labels of another batch file', 'lib/data.py',
           'y = self._to_device(torch.from_numpy(self.source.labels[step.file]))',
           'y = self._to_device(torch.from_numpy(self.source.labels[step.file - 1]))',
           ('tests/test_train.py::test_train_py_end_to_end',)),
    Mutant('the loader mirrors the crops the trainer did not mirror', 'lib/loader.py',
           'mirror = torch.from_numpy(np.frombuffer(frames[3], np.uint8) != 0)',
           'mirror = torch.from_numpy(np.frombuffer(frames[3], np.uint8) == 0)',
           ('tests/test_loader.py::test_batches_equal_the_in_process_loader',)),
    Mutant('the loader acts on a message that is not ours', 'lib/loader.py',
           'if magic != MAGIC or version != VERSION:', 'if False:',
           ('tests/test_loader.py::test_malformed_control_messages_are_rejected',)),
    Mutant('the loader outlives its killed trainer', 'lib/loader.py',
           "if os.getppid() != job['parent']:", 'if False:',
           ('tests/test_loader.py::test_loader_exits_when_its_trainer_is_killed',)),
    # --- the preprocessing writer (preprocessing/writer.py)
    Mutant('batches written with rows and columns swapped', 'preprocessing/writer.py',
           '.transpose(2, 0, 1, 3)', '.transpose(2, 1, 0, 3)',
           ('tests/test_preprocessing.py::test_batches_hold_the_images_pixel_for_pixel',)),
    Mutant('the two halves of a batch swapped', 'preprocessing/writer.py',
           'for path, part in zip(paths, np.split(batch, n, axis=3)):',
           'for path, part in zip(paths, np.split(batch, n, axis=3)[::-1]):',
           ('tests/test_preprocessing.py::test_labels_follow_the_images',)),
    Mutant('a rerun rewrites finished batch files', 'preprocessing/writer.py',
           '            if path in missing:', '            if True:',
           ('tests/test_preprocessing.py::test_resume_writes_only_what_is_missing',)),
    # --- snapshots and records (lib/checkpoint.py)
    Mutant('the file-order stream is not in the snapshot', 'lib/checkpoint.py',
           ", 'order': order_gen.get_state()}", '}',
           ('tests/test_train.py::test_two_plus_two_epochs_equal_four_bitwise',)),
    Mutant('val_record.npy columns swapped', 'lib/checkpoint.py',
           "record = np.array([[h['val_error'], h['val_loss']] for h in history], dtype=np.float64)",
           "record = np.array([[h['val_loss'], h['val_error']] for h in history], dtype=np.float64)",
           ('tests/test_train.py::test_train_py_end_to_end',)),
    Mutant('a fresh run mixes with another run in its weights_dir', 'lib/checkpoint.py',
           '    if not overwrite:\n        raise SnapshotError(', '    if False:\n        raise SnapshotError(',
           ('tests/test_train.py::test_a_fresh_run_into_another_runs_folder_is_refused_or_moves_it_aside',)),
    Mutant('a damaged snapshot ends in a traceback', 'lib/checkpoint.py',
           'except Exception as e:  # noqa: BLE001  (a truncated zip',
           'except OSError as e:  # noqa: BLE001  (a truncated zip',
           ('tests/test_train.py::test_a_damaged_snapshot_is_a_one_line_error_on_resume',)),
    # --- config (lib/config.py)
    Mutant('a config range dropped', 'lib/config.py',
           "before it stops with an error',\n                        ABOVE_0),",
           "before it stops with an error'),",
           ('tests/test_config.py::test_every_range_of_the_schema_is_tested_here',)),
    # --- issue 27: breakages that a user sees, found by an audit from outside
    Mutant('validate_performance.py ten_crop=True scores the centre crop', 'validate_performance.py',
           "cfg['crop_size'],\n                                 cfg['ten_crop'])",
           "cfg['crop_size'],\n                                 False)",
           ('tests/test_evaluate.py::test_ten_crop_scores_the_mean_softmax_of_the_ten_views',)),
    Mutant('the newest snapshot chosen by the text of its name (model_9 after model_10)',
           'lib/checkpoint.py',
           "    return sorted(int(n[6:-3]) for n in os.listdir(weights_dir)\n"
           "                  if n.startswith('model_') and n.endswith('.pt') and n[6:-3].isdigit())",
           "    return sorted((int(n[6:-3]) for n in os.listdir(weights_dir)\n"
           "                  if n.startswith('model_') and n.endswith('.pt') and n[6:-3].isdigit()), key=str)",
           ('tests/test_train.py::test_the_newest_snapshot_is_the_highest_epoch_not_the_last_name_in_text_order',)),
    Mutant('a snapshot written in place (a crash leaves a truncated newest snapshot)', 'lib/checkpoint.py',
           'atomic_write(path, lambda tmp: torch.save(dict(state, epoch=epoch), tmp))',
           'torch.save(dict(state, epoch=epoch), path)',
           ('tests/test_train.py::test_a_snapshot_cut_short_by_a_crash_never_takes_the_place_of_a_good_one',)),
    Mutant('ImageNet val labels taken by position, not by the number in the file name',
           'preprocessing/layouts.py',
           'lines = [int(m.group(1)) for m in numbers] if all(numbers) else range(1, len(names) + 1)',
           'lines = range(1, len(names) + 1)',
           ('tests/test_preprocessing.py::test_val_labels_follow_the_number_in_each_file_name_across_gaps',)),
    Mutant('a rerun after a val image left pairs the old batches with new labels', 'preprocessing/resume.py',
           "if files is not None and record['files'] != files:", 'if False:',
           ('tests/test_preprocessing.py::test_a_rerun_after_an_input_image_was_removed_stops_and_changes_'
            'nothing',)),
    Mutant('a rerun after a train image left goes ahead', 'preprocessing/resume.py',
           'if sorted(files) != train:', 'if False:',
           ('tests/test_preprocessing.py::test_a_rerun_after_an_input_image_was_removed_stops_and_changes_'
            'nothing',)),
    Mutant('the loader process never prefetches (para_load overlaps nothing)', 'lib/loader.py',
           'for slot in range(N_SLOTS):\n                request(slot)',
           'for slot in range(1):\n                request(slot)',
           ('tests/test_loader.py::test_the_loader_prepares_the_next_batch_while_the_trainer_holds_one',)),
    Mutant('lr_policy auto decides on the val loss', 'lib/trainer.py',
           "[h['val_error'] for h in self.history],", "[h['val_loss'] for h in self.history],",
           ('tests/test_train.py::test_lr_policy_auto_decides_on_the_top1_error_not_the_loss',)),
    Mutant("imported weights evaluated without the original's test-time dropout scaling",
           'pretrained/convert.py', "'dropout': 0.5},", "'dropout': 0.0},",
           ('tests/test_pretrained.py::test_imported_weights_give_the_original_logits',)),
]


def run_alone(cmd, cwd, timeout):
    """Run cmd in a process group of its own, and end whatever is left of that group after it:
    a mutant may leave processes behind (a loader that no longer follows its trainer)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope='module')
def copy(tmp_path_factory):
    """The project's files (what git does not ignore: not its venv, data, outputs or downloaded
    weights) in a folder of their own."""
    dest = tmp_path_factory.mktemp('mutant') / 'repo'
    r = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                       cwd=ROOT, capture_output=True)
    if r.returncode != 0:  # not a git checkout: everything but the usual outputs
        shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP])
        return dest
    for name in r.stdout.decode().split('\0'):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(dest / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), dest / name)
    return dest


def test_the_guarding_tests_pass_in_the_copy_unmutated(copy):
    """Else a mutant would count as caught by a test that fails anyway."""
    tests = sorted({t for m in MUTANTS for t in m.tests})
    r = run_alone([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *tests], copy,
                  timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    assert ' passed' in r.stdout and 'deselected' not in r.stdout, r.stdout[-1000:]


@pytest.mark.parametrize('mutant', MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_mutant_is_caught(copy, mutant):
    path = copy / mutant.path
    source = path.read_text()
    assert source.count(mutant.line) == 1, (
        f'{mutant.path}: the mutated line is no longer there once ({mutant.line!r}): update the '
        f'mutant "{mutant.name}" in tests/test_mutants.py')
    path.write_text(source.replace(mutant.line, mutant.mutated))
    try:
        r = run_alone([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
                       *mutant.tests], copy, timeout=600)
    finally:
        path.write_text(source)
    tail = r.stdout[-2000:] + r.stderr[-1000:]
    assert r.returncode != 0, f'the mutant "{mutant.name}" survived:\n{tail}'
    assert r.returncode == 1 and ' failed' in r.stdout, f'the tests did not run as expected:\n{tail}'


def test_docs_name_tests_that_exist():
    """docs/testing.md's table of guarantees names the tests that guard them: each must exist."""
    import re
    page = open(os.path.join(ROOT, 'docs', 'testing.md')).read()
    table = page[page.index('| guarantee | test | mutant caught |'):]
    named, current = [], None
    for file, name in re.findall(r'`(test_\w+\.py)?::(\w+)`', table.split('\n\n')[0]):
        current = file or current
        named.append((current, name))
    assert len(named) > 20
    for file, name in named:
        source = open(os.path.join(ROOT, 'tests', file)).read()
        assert f'def {name}(' in source, f'docs/testing.md names tests/{file}::{name}, which does not exist'
