"""How long does the weight exchange between two hosts take on links of real speed?
Latest answer: docs/benchmarks.md#the-exchange-on-links-of-real-speed

Two hosts made of network namespaces (benchmarks/cluster.py; needs root), the link between them
limited with tc tbf.

    .venv/bin/python -m benchmarks.links                         # 1, 5, 10 gbit and no limit
    .venv/bin/python -m benchmarks.links --rates 1gbit none --repeats 3

Per link rate: AlexNet's flat [params | momentum] (60,965,224 parameters + as many momentum
values, float32 = 488 MB per worker) averaged by train_2gpu.py's two workers over tcp
(lib/exchange.Pair, as benchmarks.exchange runs it), plain and CURVE-encrypted, and the same bytes
all-reduced by gloo as torchrun's `exchange: average` does it (lib/exchange.Distributed). Either
way each worker sends 488 MB and receives 488 MB per exchange (tcp: the half the peer averages,
then its averaged half back; gloo's ring for 2 ranks: reduce-scatter, then all-gather), so the
floor is 488 MB / link rate. Median seconds per exchange over --repeats, after one warm-up.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import header
from benchmarks.exchange import exchange_worker
from lib import ROOT, command, exchange, model
from benchmarks.cluster import Cluster, rate_bits

PORT = 5002


class PrintResult:
    def put(self, result):
        print(json.dumps({'ms': result[1], 'bytes': result[2]}), flush=True)


def allreduce_worker(rank, host, repeats):
    """torchrun's exchange: average (one all-reduce of the flat buffer, then / N) on gloo."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://{host}:{PORT}', rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    try:
        n = sum(p.numel() for p in model.build('alexnet', 1000, 0.5, 227, seed=0).parameters())
        ex = exchange.Distributed('average', 1)
        ex.flat = torch.ones(2 * n)
        ex.exchange()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ex.exchange()
            times.append(time.perf_counter() - t0)
        PrintResult().put((rank, 1000 * statistics.median(times), ex.flat.numel() * 4))
    finally:
        dist.destroy_process_group()


def run_pair(hosts, way, repeats, keys):
    """(seconds per exchange: the slower worker's median, bytes per worker) of `way` between
    the two hosts."""
    procs = []
    for rank, host in enumerate(hosts):
        cmd = [sys.executable, '-m', 'benchmarks.links', '--worker', way, '--rank', str(rank),
               '--host', hosts[0].addr, '--repeats', str(repeats),
               '--curve-dir', keys if way == 'curve' else '']
        procs.append(host.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT,
                                env=dict(os.environ, GLOO_SOCKET_IFNAME='eth0', OMP_NUM_THREADS='1')))
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f'{way} workers failed:\n' + '\n'.join(
            f'worker {r}: {err[-1500:]}' for r, (_, err) in enumerate(outs)))
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return max(r['ms'] for r in results) / 1000, results[0]['bytes']


@command
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rates', nargs='+', default=['1gbit', '5gbit', '10gbit', 'none'],
                   help="tc rates of the link, or 'none' for no limit")
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--ways', nargs='+', default=['tcp', 'curve', 'gloo'],
                   choices=['tcp', 'curve', 'gloo'])
    p.add_argument('--worker', choices=['tcp', 'curve', 'gloo'], help=argparse.SUPPRESS)
    p.add_argument('--rank', type=int, help=argparse.SUPPRESS)
    p.add_argument('--host', help=argparse.SUPPRESS)
    p.add_argument('--curve-dir', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == 'gloo':
        return allreduce_worker(args.rank, args.host, args.repeats)
    if args.worker:  # one Pair worker, in its namespace
        return exchange_worker(args.rank, 'tcp', 'cpu', f'tcp://{args.host}:{PORT}', '',
                               args.repeats, PrintResult(), curve_dir=args.curve_dir)
    print(header('cpu', 'links', argv if argv is not None else sys.argv[1:]))
    print(f'kernel {platform.release()}, {datetime.date.today().isoformat()}')
    import zmq.auth
    keys = tempfile.mkdtemp(prefix='bench-links-keys-')
    for r in (0, 1):
        zmq.auth.create_certificates(keys, f'worker{r}')
    cluster = Cluster()
    rows = []
    try:
        hosts = cluster.build(2)
        for rate in args.rates:
            hosts[1].rate(None if rate == 'none' else rate)  # both directions of the path
            for way in args.ways:
                seconds, nbytes = run_pair(hosts, way, args.repeats, keys)
                rows.append((rate, way, seconds, nbytes))
                print(f'  {rate} {way}: {seconds:.2f} s', file=sys.stderr, flush=True)
    finally:
        cluster.close()
    names = {'tcp': 'train_2gpu.py, tcp', 'curve': 'train_2gpu.py, tcp + CURVE',
             'gloo': 'torchrun average, gloo all-reduce'}
    print(f'\n### Exchange of AlexNet [params | momentum] ({rows[0][3] / 1e6:.0f} MB per worker) '
          f'between two hosts (network namespaces, veth + bridge, tc tbf), median of {args.repeats}\n')
    print('| link | way | s per exchange | MB/s each way | x link rate | x plain tcp |')
    print('|---|---|---:|---:|---:|---:|')
    plain = {rate: s for rate, way, s, _ in rows if way == 'tcp'}
    for rate, way, s, nbytes in rows:
        mb_s = nbytes / s / 1e6
        of_link = f'{mb_s * 8e6 / rate_bits(rate):.2f}' if rate != 'none' else '-'
        print(f'| {rate} | {names[way]} | {s:.2f} | {mb_s:.0f} | {of_link} | {s / plain[rate]:.2f} |')


if __name__ == '__main__':
    sys.exit(main())
