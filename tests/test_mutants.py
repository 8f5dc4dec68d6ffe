"""The mutation check: each guarantee docs/testing.md calls tested is broken on purpose, one line at a time,
in a copy of the project, and the tests that guard it must then fail.

A mutant that survives (its tests still pass) fails here: the guarantee has no test that bites.
A mutation whose line is no longer in the source fails too, so the list follows the code: when a
guarded line changes, update its mutant. A new guarantee in docs/testing.md comes with its mutant here.
Run alone:  sh test.sh tests/test_mutants.py -v
"""
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import time
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
    # --- how every command ends (lib.command)
    Mutant('a bad value ends in a traceback, not one line and exit code 2', 'lib/__init__.py',
           """print(f'{who}error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)""", 'raise',
           ('tests/test_environment.py::test_every_entry_point_says_a_bad_value_in_one_line_and_exits_2',)),
    Mutant('a bug taken for a bad value (its traceback lost)', 'lib/__init__.py',
           'except UserError as e:', 'except Exception as e:',
           ('tests/test_environment.py::test_a_bug_keeps_its_traceback_and_a_user_error_names_its_process',)),
    # --- the two-worker link (lib/link.py) and exchange (lib/exchange.py)
    Mutant('CURVE switched off between hosts', 'lib/link.py',
           '        if curve_dir:\n            self._curve(curve_dir)',
           '        if False:\n            self._curve(curve_dir)',
           ('tests/test_link.py::test_curve_encrypts_everything_on_the_wire',
            'tests/test_link.py::test_curve_refuses_clients_without_the_right_key',
            'tests/test_link.py::test_worker1_refuses_a_server_that_cannot_prove_the_secret')),
    Mutant("other users may enter the launcher's folder (the link's socket)", 'train_2gpu.py',
           "folder = tempfile.mkdtemp(prefix='alexnet-2gpu-', dir=sys.argv[1] or None)  # mode 0700",
           "folder = tempfile.mkdtemp(prefix='alexnet-2gpu-', dir=sys.argv[1] or None); "
           "os.chmod(folder, 0o755)",
           (T2 + 'test_hostile_clients_are_rejected_and_training_goes_on',)),
    # --- the launcher of train_2gpu.py: what a killed or terminated launcher leaves
    Mutant("a killed launcher's folder is left behind (its keeper removes nothing)", 'train_2gpu.py',
           'shutil.rmtree(folder, ignore_errors=True)', 'pass',
           (T2 + 'test_a_killed_launcher_leaves_no_process_and_no_folder',)),
    Mutant('the keeper removes the folder while a worker still holds it', 'train_2gpu.py',
           '        fcntl.flock(fd, fcntl.LOCK_SH)', '        pass',
           (T2 + 'test_a_killed_launcher_leaves_no_process_and_no_folder',)),
    Mutant('workers outlive a killed launcher', 'train_2gpu.py',
           'while os.getppid() == parent:', 'while True:',
           (T2 + 'test_a_killed_launcher_leaves_no_process_and_no_folder',)),
    Mutant('SIGTERM kills the launcher alone (workers and folder left to themselves)', 'lib/__init__.py',
           'before = signal.signal(signal.SIGTERM, _interrupt) if own else None', 'before = None',
           (T2 + 'test_sigterm_to_the_launcher_stops_everything',
            'tests/test_environment.py::test_sigterm_stops_a_command_as_ctrl_c_does')),
    Mutant('worker 0 reads messages of clients other than worker 1', 'lib/link.py',
           'if ident != self.peer_id:', 'if False:',
           (T2 + 'test_hostile_clients_are_rejected_and_training_goes_on',)),
    Mutant('worker 0 takes any hello as worker 1', 'lib/link.py',
           'if (kind, rank, len(parts)) != (HELLO, self.peer, 2):', 'if kind != HELLO:',
           ('tests/test_link.py::test_worker0_drops_clients_that_are_not_worker1_and_waits_for_it',)),
    Mutant('a worker that fails sends no BYE', 'lib/link.py',
           'if reason is not None and self.peer_id is not None:', 'if False:',
           (T2 + 'test_a_worker_that_fails_tells_the_other_which_names_it',)),
    Mutant('a dead peer noticed only at peer_timeout (its disconnection ignored)', 'lib/link.py',
           "if self.peer_id is not None and (self.rank == 1 or event['value'] == self.peer_fd):",
           'if False:',
           (T2 + 'test_a_killed_worker_stops_the_other_and_the_launcher',)),
    Mutant('a silent peer waited on for good (no peer_timeout)', 'lib/link.py',
           'if time.monotonic() > deadline:', 'if False:',
           ('tests/test_link.py::test_a_peer_that_is_connected_but_silent_is_named_at_peer_timeout',)),
    Mutant("the two workers' losses and errors not averaged (worker 0's half alone)", 'lib/exchange.py',
           'return ((mine + peer) / 2).to(tensor.dtype).to(tensor.device)', 'return tensor',
           (T2 + 'test_two_workers_on_halves_equal_one_worker_on_whole_batches[shm-0]',)),
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
    Mutant("ipc_open opens the peer's handle before CUDA is initialised", 'lib/exchange.py',
           '    torch.cuda._lazy_init()\n    event =', '    event =',
           ('tests/test_link.py::test_ipc_open_initialises_cuda_in_a_fresh_process_before_opening_the_handle',)),
    # --- the GPU command (benchmarks/gpu.py)
    Mutant("a CUDA test the platform refuses reads SKIPPED, not REFUSED", 'benchmarks/gpu.py',
           "        if result == 'SKIPPED' and (m.group(3) or '').startswith(REFUSED):",
           '        if False:',
           ('tests/test_benchmark_gpu.py::test_a_test_skipped_for_the_platforms_refusal_reads_refused_apart_from_failures',)),
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
    Mutant('another n_epochs accepted under cosine', 'lib/training.py',
           'if changed := [k for k in curve if saved[k] != cfg[k]]:', 'if changed := []:',
           ('tests/test_evaluate.py::test_a_cosine_run_resumes_only_along_its_own_cosine',)),
    Mutant('top-5 computed as top-1', 'lib/trainer.py',
           '(top5 != y[:, None]).all(1)', '(top5[:, :1] != y[:, None]).all(1)',
           ('tests/test_evaluate.py::test_top1_top5_and_loss_against_a_hand_computation',)),
    Mutant('autocast switched off', 'lib/step.py',
           "enabled=precision in ('bf16', 'fp16')", 'enabled=False',
           ('tests/test_precision.py::test_the_forward_runs_in_the_precision_asked_for',)),
    Mutant('compile ignored: the network runs eager', 'lib/trainer.py',
           "self.forward = torch.compile(net) if cfg['compile'] else net", 'self.forward = net',
           ('tests/test_precision.py::test_compiled_network_trains_and_snapshots_plain_keys',)),
    Mutant('label smoothing ignored', 'lib/trainer.py',
           "label_smoothing=cfg['label_smoothing']", 'label_smoothing=0.0',
           ('tests/test_evaluate.py::test_cosine_run_logs_the_scheduled_lr_and_label_smoothing_changes_the_loss',)),
    Mutant('each worker draws its own crops and mirrors', 'lib/trainer.py',
           "self.gen = torch.Generator().manual_seed(cfg['seed'])",
           "self.gen = torch.Generator().manual_seed(cfg['seed'] + exchanger.rank)",
           ('tests/test_torchrun.py::test_n_ranks_equal_one_worker[2-average-0]',)),
    Mutant("a worker's crops are the first rows of the step's, not its own", 'lib/data.py',
           '.expand(3, batch_size)[:, lo:hi]', '.expand(3, batch_size)[:, :hi - lo]',
           ('tests/test_data.py::test_a_workers_plan_is_its_rows_of_the_steps_plan',)),
    Mutant("a worker's dropout masks are the first rows of the step's, not its own", 'lib/model.py',
           '[lo:lo + len(x)]', '[:len(x)]',
           ('tests/test_model.py::test_a_workers_dropout_masks_are_its_rows_of_the_steps_masks',)),
    Mutant('worker 1 draws from its own streams after a resume', 'lib/trainer.py',
           "        checkpoint.set_rng_state(state['rng'], self.gen, self.device, self.order_gen)\n"
           "        self.history",
           "        checkpoint.set_rng_state(state['rng'], self.gen, self.device, self.order_gen)\n"
           "        self.exchanger.rank and self.gen.manual_seed(self.exchanger.rank)\n"
           "        self.history",
           ('tests/test_torchrun.py::test_ranks_resume_two_plus_two_epochs_as_four[gradients]',)),
    Mutant('a resume does not restore the dropout stream', 'lib/checkpoint.py',
           "torch.set_rng_state(state['torch'])", 'pass',
           ('tests/test_exact.py::test_one_worker_resumes_the_dropout_stream_bit_for_bit',)),
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
    Mutant('a torchrun restart starts afresh instead of resuming', 'train.py',
           'cfg.update(resume_train=True, load_epoch=latest)', 'cfg.update(load_epoch=latest)',
           ('tests/test_torchrun.py::test_max_restarts_resumes_from_the_last_snapshot',)),
    Mutant("without torchrun's rendezvous store, a node started again does not learn of the other "
           "node's restart", 'train.py',
           'dist.all_reduce(restarts, op=dist.ReduceOp.MAX)', 'pass',
           ('tests/test_torchrun.py::test_a_restart_resumes_from_rank_0s_epoch_or_stops_every_rank',)),
    Mutant('a later round of the job is taken for its first: the ranks begin a fresh run', 'train.py',
           'later = rounds.add(key, 0) > 0', 'later = False',
           ('tests/test_cluster.py::test_a_node_killed_and_started_again_resumes',)),
    Mutant('a change of nodes is not seen (the rounds are not counted): the ranks torchrun starts '
           'again without a restart begin a fresh run', 'train.py',
           'later = rounds.add(key, 0) > 0', 'later = bool(restarts)',
           ('tests/test_torchrun.py::test_a_node_that_joins_later_is_taken_in_and_resumes',)),
    Mutant('the start of a run is not reported: no round of a torchrun job counts, and the '
           'survivors of a lost node begin a fresh run', 'lib/training.py',
           '            worker.started()', '            pass',
           ('tests/test_cluster.py::test_elastic_a_node_lost_for_good_leaves_the_other_to_finish',)),
    Mutant('batch_size checked against this world size only, not every one --nnodes allows',
           'train.py', 'sizes |= {k * local for k in range(lo, hi + 1)}', 'sizes |= set()',
           ('tests/test_torchrun.py::test_batch_that_does_not_split_is_a_one_line_error',)),
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
    Mutant("the loader process subtracts another mean than validate_performance.py's", 'lib/loader.py',
           "    mean = data.load_mean(job['mean_file'], job['image_size'])\n",
           "    mean = data.load_mean(job['mean_file'], job['image_size']).round()\n",
           ('tests/test_evaluate.py::test_validate_reproduces_the_val_record_row_of_a_para_load_run[para_load]',)),
    Mutant('the loader acts on a message that is not ours', 'lib/loader.py',
           'if magic != MAGIC or version != VERSION:', 'if False:',
           ('tests/test_loader.py::test_malformed_control_messages_are_rejected',)),
    Mutant('the loader outlives its killed trainer', 'lib/loader.py',
           "if os.getppid() != job['parent']:", 'if False:',
           ('tests/test_loader.py::test_loader_exits_when_its_trainer_is_killed',)),
    # --- evaluation (validate_performance.py)
    Mutant("validate_performance.py ignores the data's mean", 'validate_performance.py',
           'mean = training.mean_image(cfg, size)',
           'mean = training.mean_image(dict(cfg, synthetic=True), size)',
           ('tests/test_evaluate.py::test_validate_reproduces_the_val_record_row',)),
    # --- the preprocessing writer (preprocessing/writer.py)
    Mutant("an image of a class tar read at its offset in the class tar, not in the archive",
           'preprocessing/archives.py',
           "entries[f'{wnid}/{direct_name(im)}'] = (offset + im.offset_data, im.size)",
           "entries[f'{wnid}/{direct_name(im)}'] = (im.offset_data, im.size)",
           ('tests/test_archives.py::test_archives_give_what_the_extracted_folders_give',)),
    Mutant('batches written with rows and columns swapped', 'preprocessing/writer.py',
           '.transpose(2, 0, 1, 3)', '.transpose(2, 1, 0, 3)',
           ('tests/test_preprocessing.py::test_batches_hold_the_images_pixel_for_pixel',)),
    Mutant('the two halves of a batch swapped', 'preprocessing/writer.py',
           'for path, part in zip(paths, np.split(batch, n, axis=3)):',
           'for path, part in zip(paths, np.split(batch, n, axis=3)[::-1]):',
           ('tests/test_preprocessing.py::test_labels_follow_the_images',)),
    Mutant("batch files the original's hickle cannot read (no `type` dataset)", 'preprocessing/writer.py',
           "f.create_dataset('type', data=np.array([b'ndarray']))", 'pass',
           ('tests/test_preprocessing.py::test_the_originals_hickle_reads_our_batch_files',)),
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
    # --- serve.py
    Mutant('serve.py starts a thread for every connection, uncapped', 'serve.py',
           'full = self.n_open >= self.max_connections', 'full = False',
           ('tests/test_serve.py::test_a_flood_of_idle_connections_is_held_to_the_cap',)),
    Mutant('serve.py never closes the connections it refused', 'serve.py',
           '            if done:\n                sock.close()',
           '            if False:\n                sock.close()',
           ('tests/test_serve.py::test_a_flood_of_idle_connections_is_held_to_the_cap',)),
    # --- config (lib/config.py) and the layers of lib/ and benchmarks/
    Mutant('lib/config.py imports torch', 'lib/config.py',
           '\nimport yaml\n', '\nimport yaml\nimport torch  # noqa: F401\n',
           ('tests/test_config.py::test_config_is_a_leaf_that_imports_no_torch',)),
    Mutant('a module of lib/ imports another inside a function (where a circle hides)', 'lib/config.py',
           'def describe(cfg):\n', 'def describe(cfg):\n    from lib import runs  # noqa: F401\n',
           ('tests/test_lint.py::test_lib_modules_import_each_other_at_the_top_without_a_circle',)),
    Mutant('a benchmark imports from tests/ (the test cluster)', 'benchmarks/links.py',
           'from benchmarks.cluster import Cluster, rate_bits\n',
           'from benchmarks.cluster import rate_bits\nfrom tests.cluster import Cluster\n',
           ('tests/test_lint.py::test_benchmarks_import_nothing_from_the_tests',)),
    Mutant('a config range dropped', 'lib/config.py',
           "before it stops with an error',\n                        ABOVE_0),",
           "before it stops with an error'),",
           ('tests/test_config.py::test_every_range_of_the_schema_is_tested_here',)),
    # --- issue 27: breakages that a user sees, found by an audit from outside
    Mutant('validate_performance.py ten_crop=True scores the centre crop', 'validate_performance.py',
           "cfg['crop_size'], cfg['ten_crop'])",
           "cfg['crop_size'], False)",
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


class Runner:
    """pytest runs in the copy, each in a fresh fork of tests/forkserver.py (started there, it has
    imported torch and the other packages once, and nothing of the project): as `python -m pytest`
    started in the copy, in a process group of its own that is killed after it, minus a new
    interpreter's start for each (~2.5 s of CPU, ~3 minutes over the check)."""

    def __init__(self, copy):
        self.copy = copy
        self.proc = subprocess.Popen([sys.executable, os.path.join('tests', 'forkserver.py')],
                                     cwd=copy, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.runs = 0

    def pytest(self, tests, timeout, *options):
        self.runs += 1
        out, err = (str(self.copy.parent / f'run{self.runs}.{s}') for s in ('out', 'err'))
        args = [*options, '-q', '-p', 'no:cacheprovider', *tests]
        self.proc.stdin.write(json.dumps({'args': args, 'out': out, 'err': err,
                                          'timeout': timeout}) + '\n')
        self.proc.stdin.flush()
        ready = select.select([self.proc.stdout], [], [], timeout + 60)[0]
        line = self.proc.stdout.readline() if ready else ''
        assert line, f'tests/forkserver.py did not answer within {timeout + 60} s (exit code ' \
                     f'{self.proc.poll()})'
        rc = json.loads(line)['rc']
        with open(out) as o, open(err) as e:
            r = subprocess.CompletedProcess(args, rc, o.read(), e.read())
        assert rc is not None, f'pytest {" ".join(tests)} ran past {timeout} s:\n{r.stdout[-2000:]}'
        return r

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


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


@pytest.fixture(scope='module')
def runner(copy):
    r = Runner(copy)
    yield r
    r.close()


STAMPS = itertools.count()


def write(path, text):
    """Python takes a module's cached bytecode while the source's size and mtime (in whole seconds)
    match: a mutant of the same size written within the second would run as the old code. Each
    write gets an mtime of its own, later than any before."""
    path.write_text(text)
    t = int(time.time()) + next(STAMPS)
    os.utime(path, (t, t))


# guarding tests of a second or less, run unmutated in the copy even where they passed in the session
QUICK = ('tests/test_preprocessing.py', 'tests/test_evaluate.py', 'tests/test_config.py')


def test_the_guarding_tests_pass_in_the_copy_unmutated(runner):
    """Else a mutant would count as caught by a test that fails anyway. The guarding tests that
    passed earlier in this session (the test command runs this file after the others, handing it
    what passed: tools/suite.py, tests/conftest.py) are taken as passing; the copy holds the same
    files as the checkout (git's), so they pass there too. The others (this file run alone, or
    with -k) run in the copy, unmutated, as do the quick ones (QUICK) in any case: they show that
    a run in tests/forkserver.py passes where a fresh interpreter's does."""
    from tests.conftest import passed
    tests = sorted(t for t in {t for m in MUTANTS for t in m.tests}
                   if not passed(t) or t.startswith(QUICK))
    r = runner.pytest(tests, 900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    assert ' passed' in r.stdout and 'deselected' not in r.stdout, r.stdout[-1000:]


@pytest.mark.parametrize('mutant', MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_mutant_is_caught(copy, runner, mutant):
    path = copy / mutant.path
    source = path.read_text()
    assert source.count(mutant.line) == 1, (
        f'{mutant.path}: the mutated line is no longer there once ({mutant.line!r}): update the '
        f'mutant "{mutant.name}" in tests/test_mutants.py')
    write(path, source.replace(mutant.line, mutant.mutated))
    try:
        r = runner.pytest(mutant.tests, 600, '-x')
    finally:
        write(path, source)
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
