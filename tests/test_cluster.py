"""Many machines, on a test cluster of network namespaces (tests/cluster.py): torchrun across two
hosts trains as one worker; a node killed whole and started again resumes; in an elastic job
(--nnodes=MIN:MAX) a node lost for good leaves the others to resume and finish, on 2 nodes and on
4 nodes of 2 ranks; with a fixed number of nodes a node that never comes back, or a lost node
without restarts, stops the other cleanly; train_2gpu.py's two workers on two hosts (tcp, CURVE)
train as one worker, refuse a third host, ride out a short link cut and stop cleanly on a dead
peer or a long cut."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib import config, training
from tests.cluster import cluster  # noqa: F401  (the fixture)
from tests.helpers import make_batches
from tests.test_loader import gone_within
from tests.test_torchrun import DEFAULTS, QUICK_RDZV, Lines, one_worker, ranks
from tests.test_train_2gpu import EXACT, EXACT_TOLERANCE, SCRIPT, args, dataset, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RDZV_PORT = 29500
# the defaults of config.yaml (alexnet, dropout 0.5, crop_size 227, random crops and mirrors),
# shuffled, in fp64
ALEXNET = dict(shuffle=True, precision='fp64', print_freq=1)


def torchrun_node(host, store_host, values, tmp_path, restarts=0, join_timeout=60, share=True,
                  nnodes='2', nproc=1, rdzv=''):
    """docs/distributed.md's two-machine command, as tested: --local-addr on every node (the address the
    other nodes reach it at: MASTER_ADDR when it is the first node), is_host on the node of the
    rendezvous endpoint (its hostname need not resolve to that address), GLOO_SOCKET_IFNAME
    (gloo otherwise takes the address of the hostname: here a loopback one)."""
    conf = ','.join([f'join_timeout={join_timeout}'] + ([rdzv] if rdzv else [])
                    + (['is_host=1'] if host is store_host else []))
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}',
           f'--nproc-per-node={nproc}', '--rdzv-backend=c10d',
           f'--rdzv-endpoint={store_host.addr}:{RDZV_PORT}', '--rdzv-id=cluster',
           f'--rdzv-conf={conf}', f'--local-addr={host.addr}', f'--max-restarts={restarts}',
           os.path.join(ROOT, 'train.py')] + args(values)
    env = dict(os.environ, OMP_NUM_THREADS='1', GLOO_SOCKET_IFNAME='eth0', TMPDIR=str(tmp_path),
               PYTHONFAULTHANDLER='1')
    if not share:  # torch's shared store cannot take a node started again (docs/distributed.md)
        env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE'] = '1'
    return host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                      cwd=tmp_path)


def reference(tmp_path, n_train, n_epochs, seed=0, batch=8, settings=EXACT, size=36, n_val=2):
    """(config values, one worker's last snapshot) on whole batches, fp64."""
    keys = make_batches(str(tmp_path / 'data'), n_train=n_train, n_val=n_val, batch=batch,
                        size=size, seed=seed)
    values = dict(keys, **dict(settings, n_epochs=n_epochs), seed=seed, gpu='cpu')
    one_worker(dict(values, weights_dir=str(tmp_path / 'w1')))
    return values, torch.load(tmp_path / 'w1' / f'model_{n_epochs}.pt', weights_only=True)


def assert_same_weights(got, ref):
    for part in ('model', 'momentum'):
        for k in ref[part]:
            assert relative_error(got[part][k], ref[part][k]) < EXACT_TOLERANCE, (part, k)


def finish(procs, timeout):
    """[(exit code, output)] of every process, each killed if still running after `timeout` s."""
    deadline, out = time.monotonic() + timeout, []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def wait_for(path, procs, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert all(p.poll() is None for p in procs), finish(procs, 5)
        assert time.monotonic() < deadline, f'no {path} within {timeout} s'
        time.sleep(0.1)


def kill_host(host):
    """The whole node: its agent and ranks, SIGKILL, as when a machine dies."""
    for pid in host.pids():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize('mode', ['average', 'gradients'])
def test_torchrun_on_two_hosts_equals_one_worker(cluster, tmp_path, mode):
    """Same weights as one worker although node B's link is down for 3 s in epoch 2 (well under
    peer_timeout: TCP resends)."""
    a, b = cluster(2)
    values, ref = reference(tmp_path, n_train=20, n_epochs=2)
    values = dict(values, weights_dir=str(tmp_path / 'w'), peer_timeout=30.0, exchange=mode)
    procs = [torchrun_node(h, a, values, tmp_path) for h in (a, b)]
    try:
        wait_for(tmp_path / 'w' / 'model_1.pt', procs, 120)
        b.link(False)
        time.sleep(3.0)
    finally:
        b.link(True)
    results = finish(procs, 180)
    assert [rc for rc, _ in results] == [0, 0], results
    assert 'batches of 8 (2 workers x 4)' in results[0][1] + results[1][1]
    assert_same_weights(torch.load(tmp_path / 'w' / 'model_2.pt', weights_only=True), ref)


def test_torchrun_link_down_past_peer_timeout_stops_both_ranks(cluster, tmp_path):
    """Node B's link down for good: both ranks stop within peer_timeout + 10 s, node A's agent
    too; node B's agent, cut off from the rendezvous store on A, does not stop by itself
    (torch's: docs/distributed.md) and is killed here by the fixture."""
    a, b = cluster(2)
    keys = make_batches(str(tmp_path / 'data'), n_train=20, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(EXACT, n_epochs=50), gpu='cpu', weights_dir=str(tmp_path / 'w'),
                  peer_timeout=8.0)
    procs = [torchrun_node(h, a, values, tmp_path) for h in (a, b)]
    try:
        wait_for(tmp_path / 'w' / 'model_1.pt', procs, 120)
        rank_b = list(ranks(procs[1].pid).values())
        b.link(False)
        t0 = time.monotonic()
        (rc, out), = finish(procs[:1], 60)
        elapsed = time.monotonic() - t0
        assert rank_b and all(gone_within(pid, max(0.0, 18.0 - (time.monotonic() - t0)))
                              for pid in rank_b)
    finally:
        b.link(True)
        (_, out_b), = finish(procs[1:], 1)
    assert rc != 0 and elapsed < 8.0 + 10.0, (elapsed, out[-3000:])
    assert a.pids() == []
    for who, text in (('rank 0', out), ('rank 1', out_b)):
        assert f'{who}: error: a peer rank died, stalled or failed (torch.distributed:' in text, \
            text[-3000:]
    assert not os.path.exists(tmp_path / 'w' / 'model_2.pt')


def test_a_node_killed_and_started_again_resumes(cluster, tmp_path):
    """Node B's agent and rank killed in epoch 2, its torchrun started again: both rendezvous
    again, resume from epoch 1 and end with the weights of an uninterrupted run."""
    a, b = cluster(2)
    values, ref = reference(tmp_path, n_train=20, n_epochs=3)
    values = dict(values, weights_dir=str(tmp_path / 'w'), peer_timeout=20.0)
    procs = [torchrun_node(h, a, values, tmp_path, restarts=1, share=False) for h in (a, b)]
    try:
        wait_for(tmp_path / 'w' / 'model_1.pt', procs, 120)
        kill_host(b)
        procs[1].wait(10)
        procs[1] = torchrun_node(b, a, values, tmp_path, restarts=1, share=False)
        results = finish(procs, 180)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = results[0][1] + results[1][1]
    assert [rc for rc, _ in results] == [0, 0], out[-6000:]
    assert 'torchrun round 2: resuming from epoch 1 on 2 ranks (2 in round 1)' in out
    state = torch.load(tmp_path / 'w' / 'model_3.pt', weights_only=True)
    assert [h['epoch'] for h in state['history']] == [1, 2, 3]
    assert_same_weights(state, ref)


def test_a_lost_node_stops_the_other(cluster, tmp_path):
    """Without restarts, node A's rank and agent exit non-zero within peer_timeout + 10 s of node
    B's death, the rank naming the lost peer, and no snapshot of the unfinished epoch is written.
    With restarts but node B never back, node A stops when the rendezvous times out."""
    a, b = cluster(2)
    keys = make_batches(str(tmp_path / 'data'), n_train=20, n_val=2, batch=8, size=36)
    values = dict(keys, **dict(EXACT, n_epochs=50), gpu='cpu', weights_dir=str(tmp_path / 'w'),
                  peer_timeout=15.0)
    for restarts, limit in ((0, 15.0 + 10.0), (1, 15.0 + 10.0 + 15.0)):
        procs = [torchrun_node(h, a, values, tmp_path, restarts=restarts, join_timeout=10)
                 for h in (a, b)]
        wait_for(tmp_path / 'w' / 'model_1.pt', procs, 120)
        kill_host(b)
        t0 = time.monotonic()
        (rc, out), _ = finish(procs, limit + 30)
        elapsed = time.monotonic() - t0
        assert rc != 0 and elapsed < limit, (restarts, elapsed, out[-4000:])
        assert a.pids() == [], out[-3000:]  # agent and rank gone
        if restarts:
            assert 'RendezvousTimeoutError' in out, out[-3000:]
        else:
            assert 'error: a peer rank died, stalled or failed (torch.distributed:' in out
            assert b.addr in out, out[-3000:]  # names the peer
        assert sorted(os.listdir(tmp_path / 'w'))[:1] == ['config.yaml'] and not any(
            n.startswith('model_') and n != 'model_1.pt' or n.startswith('.')
            for n in os.listdir(tmp_path / 'w')), os.listdir(tmp_path / 'w')
        os.remove(tmp_path / 'w' / 'model_1.pt')


def elastic_run(hosts, tmp_path, values, ref, nnodes, nproc, n_epochs):
    """An elastic job on `hosts` (the endpoint on the first), the last host killed whole once
    model_1.pt is written and never started again: every other node resumes and finishes with
    the weights of one uninterrupted worker. Returns the first node's output and the figures."""
    t0 = time.monotonic()
    nodes = [Lines(torchrun_node(h, hosts[0], values, tmp_path, restarts=1, share=False,
                                 nnodes=nnodes, nproc=nproc, rdzv=QUICK_RDZV)) for h in hosts]
    try:
        wait_for(tmp_path / 'w' / 'model_1.pt', [n.proc for n in nodes], 180)
        kill_host(hosts[-1])
        t_kill = time.monotonic()
        world = nproc * (len(hosts) - 1)
        t_resume = nodes[0].when(
            rf'torchrun round 2: resuming from epoch 1 on {world} ranks? \({world + nproc} in '
            r'round 1\)', 120)
        results = [n.finish(300) for n in nodes[:-1]]
        total = time.monotonic() - t0
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.kill()
    assert [rc for rc, _ in results] == [0] * len(results), [out[-3000:] for _, out in results]
    out = results[0][1]
    assert f'batches of {values["batch_size"]} ({world} workers x {values["batch_size"] // world})' in out
    state = torch.load(tmp_path / 'w' / f'model_{n_epochs}.pt', weights_only=True)
    assert [h['epoch'] for h in state['history']] == list(range(1, n_epochs + 1))
    difference = max(relative_error(state[part][k], ref[part][k])
                     for part in ('model', 'momentum') for k in ref[part])
    print(f'elastic {nnodes} x {nproc}: the ranks resumed {t_resume - t_kill:.1f} s after the '
          f'node was lost; {total:.1f} s in all; largest relative difference to one '
          f'uninterrupted worker {difference:.1e}')
    assert_same_weights(state, ref)
    return out


def test_elastic_a_node_lost_for_good_leaves_the_other_to_finish(cluster, tmp_path):
    """--nnodes=1:2 --max-restarts=1, the default network (alexnet, dropout 0.5, 227 px random
    crops and mirrors; fp64), one step of 4 images an epoch: node B killed whole in epoch 2
    and never back. Node A's rank stops (its peer died), A's agent rendezvous again alone once
    B's heartbeat is 3 s overdue, and its rank resumes from epoch 1 on 1 rank and ends with the
    weights of one uninterrupted worker."""
    a, b = cluster(2)
    values, ref = reference(tmp_path, n_train=1, n_epochs=2, batch=4, size=232, n_val=1,
                            settings=ALEXNET)
    values = dict(values, weights_dir=str(tmp_path / 'w'), peer_timeout=60.0)
    out = elastic_run([a, b], tmp_path, values, ref, '1:2', 1, 2)
    assert ref['config']['model'] == 'alexnet' and ref['config']['dropout'] == 0.5
    assert 'rank 0: error: a peer rank died, stalled or failed' in out  # B's loss, then the resume
    assert 'batches of 4 (2 workers x 2)' in out


def test_elastic_four_nodes_of_two_ranks_lose_one(cluster, tmp_path):
    """--nnodes=2:4 --nproc-per-node=2 (batches of 24: 4, 6 and 8 ranks split them): the fourth
    node killed whole in epoch 2; the 6 ranks of the other three resume from epoch 1 and end with
    the weights of one uninterrupted worker."""
    hosts = cluster(4)
    values, ref = reference(tmp_path, n_train=6, n_epochs=3, batch=24, settings=DEFAULTS)
    values = dict(values, weights_dir=str(tmp_path / 'w'), peer_timeout=20.0)
    out = elastic_run(hosts, tmp_path, values, ref, '2:4', 2, 3)
    assert 'batches of 24 (8 workers x 3)' in out


def worker_on(host, rank, values, tmp_path):
    """docs/distributed.md's two-host command: train_2gpu.py --worker <rank> on `host`."""
    return host.popen([sys.executable, SCRIPT, '--worker', str(rank)] + args(values),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                      env=dict(os.environ, OMP_NUM_THREADS='1'))


def two_host_run(tmp_path, a, n_train, **over):
    """(values, one worker's model_2.pt) for train_2gpu.py's workers on hosts over CURVE tcp."""
    full, halves = dataset(tmp_path, n_train=n_train)
    training.run(config.merge({**config.CONFIG, **config.SPEC_1GPU}, [('test', dict(
        full, **EXACT, gpu='cpu', weights_dir=str(tmp_path / 'w1')), None)]))
    r = subprocess.run([sys.executable, SCRIPT, '--make-keys', str(tmp_path / 'keys')],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    values = dict(halves, **EXACT, gpu0='cpu', gpu1='cpu', weights_dir=str(tmp_path / 'w2'),
                  exchange_host=a.addr, curve_dir=str(tmp_path / 'keys'), sock_gpu=5002,
                  exchange_transport='tcp', peer_timeout=20.0)
    values.update(over)
    return values, torch.load(tmp_path / 'w1' / 'model_2.pt', weights_only=True)


# a client on a third host, without the keys: ZeroMQ messages, then a plain TCP connection
STRANGER = """
import os, socket, time, zmq
s = zmq.Context().socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect('tcp://{addr}:5002')
for _ in range(20):
    try:
        s.send_multipart([b'ALXW', b'x' * 32], flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    time.sleep(0.1)
socket.create_connection(('{addr}', 5002), timeout=5).sendall(b'x' * 1000)
print('sent', flush=True)
os._exit(0)
"""


def test_train_2gpu_on_two_hosts_rides_out_a_short_cut_and_refuses_a_third(cluster, tmp_path):
    """Same weights as one worker although node B's link is down for 3 s in epoch 2 (well under
    the heartbeat timeout) and a client on a third host without the keys tries to connect."""
    a, b, c = cluster(3)
    values, ref = two_host_run(tmp_path, a, n_train=20)
    procs = [worker_on(h, r, values, tmp_path) for r, h in enumerate((a, b))]
    try:
        wait_for(tmp_path / 'w2' / 'model_1.pt', procs, 120)  # worker 0 has bound its port
        stranger = c.popen([sys.executable, '-c', STRANGER.format(addr=a.addr)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        b.link(False)
        time.sleep(3.0)
        b.link(True)
        results = finish(procs, 180)
        assert stranger.communicate(timeout=30)[0].strip() == 'sent'
    finally:
        b.link(True)
    assert [rc for rc, _ in results] == [0, 0], results
    assert 'done: epoch 2' in results[0][1]
    assert_same_weights(torch.load(tmp_path / 'w2' / 'model_2.pt', weights_only=True), ref)


def test_train_2gpu_on_two_hosts_stops_on_a_dead_peer_or_a_long_cut(cluster, tmp_path):
    a, b = cluster(2)
    values, _ = two_host_run(tmp_path, a, n_train=4, n_epochs=100, peer_timeout=8.0)
    for cut in (False, True):
        # a run of its own each time: the first may have left several snapshots behind, and a
        # fresh run into a weights_dir with snapshots is refused
        weights = tmp_path / ('w3' if cut else 'w2')
        values['weights_dir'] = str(weights)
        procs = [worker_on(h, r, values, tmp_path) for r, h in enumerate((a, b))]
        try:
            wait_for(weights / 'model_1.pt', procs, 120)
            t0 = time.monotonic()
            b.link(False) if cut else kill_host(b)
            results = finish(procs, 60)
            elapsed = time.monotonic() - t0
        finally:
            b.link(True)
        assert elapsed < 8.0 + 5.0, (cut, elapsed, results)
        assert results[0][0] == 2, results
        errors = [line for line in results[0][1].splitlines() if 'error:' in line]
        # the lost connection, or (when ZeroMQ did not report it) the peer_timeout
        assert len(errors) == 1 and errors[0].startswith('worker 0: error: ') and \
            'worker 1' in errors[0] and 'at step' in errors[0], results[0][1][-3000:]
        if cut:  # both sides see it: at peer_timeout, or as ZeroMQ's heartbeats (as long) drop the link
            assert results[1][0] == 2 and re.search(
                r'worker 1: error: (worker 0 did not answer within 8 s|lost the connection to worker 0)',
                results[1][1]), results[1][1][-3000:]
        assert a.pids() == [] and b.pids() == []
