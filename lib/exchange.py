"""How workers keep their weights in step. The training loop talks to one of these and never
asks how many workers there are.

    rank, is_main        this worker's number; True for the one worker that logs and writes files
    size                 the number of workers (their images per step add up)
    wrap(model)          the module the loop calls forward on (DistributedDataParallel for
                         torchrun's exchange: gradients; the model itself otherwise)
    attach(params, momentum, device)
                         called once the model and optimiser exist (after a resume)
    after_step()         called after every optimiser step (the 2-worker exchanger swaps and
                         averages parameters and momentum here every exchange_freq steps)
    flush()              end of an epoch: exchange now if steps are pending, so that every
                         worker validates and snapshots the same weights
    average(tensor)      the mean of a metrics tensor over all workers
    close(reason=None)   with a reason: this worker stops on an error, tell the others

Pair is the original's 2-GPU exchange (reference §1.3), made exact and fast: parameters and
momentum live in ONE flat float32 (fp64: float64) buffer per worker, [params | momentum], the module's tensors
being views into it; an exchange averages it with the peer's. Each worker averages its own half
of the buffer, (mine + peer) / 2, and writes the result into both buffers, so the two workers end
bitwise identical and each reads and writes half the bytes:

    shm  CPU workers: both buffers are files in a private folder on /dev/shm, mapped by both
    ipc  GPU workers on one host: the peer's buffer is opened from its CUDA IPC handle, once
    tcp  the bytes travel over the ZeroMQ link (workers on two hosts, or a CPU and a GPU):
         each sends the half the other averages, then gets its averaged half back, in
         pipelined chunks

The link (lib/link.py) carries barriers and metrics as typed messages and fails loudly.
"""
import os

import numpy as np
import torch

from lib import link
from lib.link import ExchangeError, PeerError  # noqa: F401  (re-exported for the launchers)

BLOCK = 1 << 18  # CPU averaging block (1 MiB of float32): average and copy back while in cache
CHUNK = 1 << 22  # tcp message (16 MiB of float32): averaged and sent back while the next arrives


class Local:
    """One worker: nothing to exchange."""
    rank, is_main, size = 0, True, 1
    same_gradients = True  # every worker steps with the same gradients (one worker; DDP)

    def wrap(self, model):
        return model

    def attach(self, params, momentum, device):
        pass

    def after_step(self):
        pass

    def flush(self):
        pass

    def average(self, tensor):
        return tensor

    def close(self, reason=None):
        pass


def flatten(params, momentum, alloc):
    """Move the parameters (in place, through .data) and their momentum buffers (list entries
    replaced) into one flat buffer [params | momentum] made by alloc(numel); returns it.
    Each view keeps its tensor's strides, so channels_last weights stay channels_last."""
    dtypes = {p.dtype for p in params} | {p.device for p in params}
    if len(dtypes) != 2 or params[0].dtype not in (torch.float32, torch.float64):
        raise ExchangeError(f'the exchange needs float32 (or float64) parameters on one device, '
                            f'got {dtypes}')
    n = sum(p.numel() for p in params)
    flat = alloc(2 * n)
    offset = 0
    for i, p in enumerate(params):
        if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
            raise ExchangeError(f'parameter {i} {tuple(p.shape)} is not dense')
        view = flat.as_strided(p.shape, p.stride(), offset)
        view.copy_(p.detach())
        p.data = view
        m = flat.as_strided(p.shape, p.stride(), n + offset)
        m.copy_(momentum[i])
        momentum[i] = m
        offset += p.numel()
    return flat


def transport_for(choice, devices, same_host=True):
    """The transport `auto` picks for two workers on `devices` (torch.device pair)."""
    kinds = {d.type for d in devices}
    if choice != 'auto':
        if choice == 'ipc' and kinds != {'cuda'}:
            raise ExchangeError(f'exchange_transport ipc needs two CUDA workers, got {devices}')
        if choice == 'shm' and kinds != {'cpu'}:
            raise ExchangeError(f'exchange_transport shm needs two CPU workers, got {devices}')
        if choice in ('ipc', 'shm') and not same_host:
            raise ExchangeError(f'exchange_transport {choice} needs both workers on one host')
        return choice
    if not same_host or len(kinds) > 1:
        return 'tcp'
    return 'ipc' if kinds == {'cuda'} else 'shm'


def ipc_share(t):
    """The CUDA IPC description of a flat device tensor, as JSON-able plain values."""
    dev, handle, size, offset, ref, ref_offset, event, event_sync = t.untyped_storage()._share_cuda_()
    return {'device': dev, 'handle': handle.hex(), 'size': size, 'offset': offset,
            'ref': ref.hex(), 'ref_offset': ref_offset, 'event': event.hex() if event else None,
            'event_sync': bool(event_sync), 'storage_offset': t.storage_offset(), 'numel': t.numel(),
            'dtype': str(t.dtype).removeprefix('torch.')}


def ipc_open(info):
    """The peer's flat tensor from its ipc_share() description (opened once). Initialises CUDA
    first: _new_shared_cuda goes straight to C++ and uses the caching allocator's per-device
    state, which only torch.cuda._lazy_init() sets up (torch's own rebuild_cuda_tensor does the
    same); in a fresh process that has not touched the GPU yet it would crash without it."""
    torch.cuda._lazy_init()
    event = bytes.fromhex(info['event']) if info['event'] else None
    storage = torch.UntypedStorage._new_shared_cuda(
        info['device'], bytes.fromhex(info['handle']), info['size'], info['offset'],
        bytes.fromhex(info['ref']), info['ref_offset'], event, info['event_sync'])
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=getattr(torch, info['dtype']),
                                       _internal=True)
    return torch._utils._rebuild_tensor(typed, info['storage_offset'], (info['numel'],), (1,))


def host_buffer(numel, dtype):
    """(buffer, refusal): a host buffer of numel values for the tcp exchange, page-locked
    (cudaHostAlloc) where CUDA is, so that its copies to and from the device are DMAs; where the
    platform refuses to page-lock that much (e.g. a sandbox), pageable memory instead, with a
    notice, and refusal holds the error. On the CPU, pageable memory and refusal None."""
    if not torch.cuda.is_available():
        return torch.empty(numel, dtype=dtype), None
    try:
        return torch.empty(numel, dtype=dtype, pin_memory=True), None
    except RuntimeError as e:  # torch's CUDA error check has reset the runtime's last error
        error = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f'notice: page-locking {numel * dtype.itemsize / 1e6:.0f} MB of host memory for the '
              f'exchange was refused ({error}); it uses pageable memory', flush=True)
        return torch.empty(numel, dtype=dtype), error


def chunks(lo, hi, size=CHUNK):
    """[lo, hi) in pieces of at most `size` (both workers cut a half alike)."""
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


class Periodic(Local):
    """after_step / flush of the exchangers that average the flat buffer every `freq` steps."""
    flat, freq, pending, steps = None, 1, 0, 0

    def after_step(self):
        self.steps += 1
        if self.flat is None:  # nothing to average (torchrun's exchange: gradients)
            return
        self.pending += 1
        if self.pending >= self.freq:
            self.exchange()

    def flush(self):
        if self.pending:
            self.exchange()


class Pair(Periodic):
    """One of the two workers of train_2gpu.py (see the module docstring)."""
    same_gradients = False

    def __init__(self, rank, transport, endpoint, *, freq=1, timeout=120.0, curve_dir='',
                 shm_dir=''):
        """Worker `rank` of two; the link on `endpoint` (lib/link.py), CURVE with the keys in
        curve_dir; exchange every `freq` steps; wait for the peer at most `timeout` s."""
        self.rank, self.is_main, self.size = rank, rank == 0, 2
        self.transport, self.shm_dir = transport, shm_dir
        self.endpoint, self.curve_dir = endpoint, curve_dir
        self.freq, self.timeout = freq, timeout
        self.link = None
        self.seq = 0        # collective operations so far: both workers must agree on it

    # --- setup ----------------------------------------------------------------------------
    def attach(self, params, momentum, device):
        self.device = device
        own_file = os.path.join(self.shm_dir, f'state{self.rank}') if self.transport == 'shm' else None
        n = 2 * sum(p.numel() for p in params)
        dtype = params[0].dtype  # float32; float64 with precision fp64
        if own_file:
            alloc = lambda numel: torch.from_file(own_file, shared=True, size=numel,  # noqa: E731
                                                  dtype=dtype)
        else:
            alloc = lambda numel: torch.empty(numel, dtype=dtype, device=device)  # noqa: E731
        self.flat = flatten(params, momentum, alloc)
        info = {'rank': self.rank, 'numel': n, 'transport': self.transport, 'dtype': str(dtype)}
        if self.transport == 'ipc':
            info['ipc'] = ipc_share(self.flat)
        self.link = link.Link(self.rank, self.endpoint, self.timeout, self.curve_dir,
                              max_frame=self.flat.element_size() * (n - n // 2))
        peer = self.link.handshake(info)
        if (peer.get('numel'), peer.get('transport'), peer.get('dtype')) != (n, self.transport,
                                                                            str(dtype)):
            raise ExchangeError(f"worker {1 - self.rank} holds {peer.get('numel')} "
                                f"{peer.get('dtype')} values over {peer.get('transport')}, this "
                                f"worker {n} {dtype} over {self.transport}: "
                                f"the two workers must run the same model and config")
        half = n // 2  # worker 0 averages [0, half), worker 1 [half, n)
        self.own = (0, half) if self.rank == 0 else (half, n)
        self.other = (half, n) if self.rank == 0 else (0, half)
        if self.transport == 'shm':
            peer_file = os.path.join(self.shm_dir, f'state{1 - self.rank}')
            self.peer_flat = torch.from_file(peer_file, shared=True, size=n, dtype=dtype)
        elif self.transport == 'ipc':
            self.peer_flat = ipc_open(peer['ipc'])
            if self.peer_flat.device != self.flat.device:  # two GPUs: a peer-to-peer copy first
                self.scratch = torch.empty(self.own[1] - self.own[0], dtype=dtype, device=device)
        else:
            self.host = self.flat if device.type == 'cpu' else host_buffer(n, dtype)[0]
            self.scratch = torch.empty(self.own[1] - self.own[0], dtype=dtype)
        self.exchange()  # start from bitwise identical weights, whatever happened before
        if own_file:     # both buffers are mapped now: nothing is left on /dev/shm if we are killed
            os.unlink(own_file)

    # --- the exchange -----------------------------------------------------------------------
    def exchange(self):
        """Average [params | momentum] with the peer's: both end with (mine + peer) / 2."""
        self.seq += 1
        self.link.step = self.steps
        if self.transport == 'tcp':
            self._exchange_tcp(self.seq)
        else:
            self._exchange_shared(self.seq)
        self.pending = 0

    def _sync(self):
        if self.device.type == 'cuda':  # the step's kernels have written the buffer
            torch.cuda.synchronize(self.device)

    def _exchange_shared(self, seq):
        lo, hi = self.own
        self._sync()
        self.link.send(link.ARRIVE, seq)          # barrier: both buffers hold this step's values
        self.link.recv(link.ARRIVE, seq)
        mine, peer = self.flat[lo:hi], self.peer_flat[lo:hi]
        if self.device.type == 'cuda':
            if peer.device != mine.device:
                self.scratch.copy_(peer)
                peer_local = self.scratch
            else:
                peer_local = peer
            mine.add_(peer_local).mul_(0.5)
            peer.copy_(mine)
        else:
            for b in range(0, hi - lo, BLOCK):
                m, p = mine[b:b + BLOCK], peer[b:b + BLOCK]
                m.add_(p).mul_(0.5)
                p.copy_(m)
        self._sync()
        self.link.send(link.DONE, seq)            # barrier: nobody reads my buffer any more
        self.link.recv(link.DONE, seq)

    def _exchange_tcp(self, seq):
        """In chunks, pipelined: both send every chunk of the half the other averages, then each
        averages its chunks as they arrive and sends each back at once, so the link carries
        the averaged half right behind the raw one instead of after it (benchmarks.links, AlexNet
        on a 5 gbit link: 0.83 s per exchange, 0.94 of the link rate; 0.99-1.30 s in two halves)."""
        if self.host is not self.flat:
            self.host.copy_(self.flat)
        host = self.host.numpy()
        lo, _ = self.own
        sent = [(a, b, self.link.send(link.DATA, seq, memoryview(host[a:b]), track=True))
                for a, b in chunks(*self.other)]
        back = []
        for a, b in chunks(*self.own):
            part = self.scratch[a - lo:b - lo]
            self.link.recv(link.DATA, seq, into=part.numpy())
            self.host[a:b].add_(part).mul_(0.5)
            back.append(self.link.send(link.DATA, seq, memoryview(host[a:b]), track=True))
        for a, b, tracker in sent:
            self._wait_sent(tracker)         # before that chunk is overwritten
            self.link.recv(link.DATA, seq, into=host[a:b])
        for tracker in back:
            self._wait_sent(tracker)         # before the next step writes the buffer
        if self.host is not self.flat:
            self.flat.copy_(self.host)

    def _wait_sent(self, tracker):
        try:
            tracker.wait(self.timeout)
        except Exception:  # zmq.NotDone
            raise PeerError(f'worker {1 - self.rank} did not take the exchange data within '
                            f'{self.timeout:g} s (peer_timeout) at step {self.steps}') from None

    # --- metrics and shutdown -------------------------------------------------------------------
    def average(self, tensor):
        self.seq += 1
        self.link.step = self.steps
        mine = tensor.detach().to('cpu', torch.float64).contiguous()
        self.link.send(link.METRIC, self.seq, mine.numpy().tobytes())
        frames = self.link.recv(link.METRIC, self.seq)
        if len(frames) != 1 or len(frames[0]) != mine.numel() * 8:
            raise ExchangeError(f'worker {1 - self.rank} sent a metric of another size at step {self.steps}')
        peer = torch.from_numpy(np.frombuffer(frames[0], np.float64).copy()).view(mine.shape)
        return ((mine + peer) / 2).to(tensor.dtype).to(tensor.device)

    def close(self, reason=None):
        if self.link is not None:
            self.link.close(reason)
            self.link = None


class Distributed(Periodic):
    """torchrun: one process per rank on torch.distributed (NCCL on GPUs, gloo on CPUs), with the
    process group already initialised.

    mode 'average': the original's semantics for N workers: every `freq` steps, all-reduce the
      flat [params | momentum] buffer and divide by N (one collective per exchange).
    mode 'gradients': DistributedDataParallel averages the gradients during backward (bucketed,
      overlapped with compute); parameters and momentum then stay identical without exchanges.
    """

    def __init__(self, mode, freq):
        import torch.distributed as dist
        self.dist = dist
        self.mode, self.freq = mode, freq
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.same_gradients = mode == 'gradients'  # all-reduced in backward
        self.is_main = self.rank == 0

    def wrap(self, model):
        if self.mode != 'gradients':
            return model
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        # our nets have no buffers (no batch norm), so there is nothing to broadcast per step
        return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)

    def attach(self, params, momentum, device):
        if self.mode == 'average':
            self.flat = flatten(params, momentum,
                                lambda n: torch.empty(n, dtype=params[0].dtype, device=device))
            self.exchange()  # identical start, whatever happened before
        else:  # DDP broadcast rank 0's parameters; the momentum (zeros, or resumed) follows it
            for m in momentum:
                self.dist.broadcast(m, 0)

    def exchange(self):
        self.dist.all_reduce(self.flat)  # sum over ranks
        self.flat.div_(self.size)
        self.pending = 0

    def average(self, tensor):
        t = tensor.detach().clone()
        self.dist.all_reduce(t)
        return t / self.size
