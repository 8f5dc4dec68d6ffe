"""para_load: a separate loader process that prepares the next batch while the trainer computes.

The trainer keeps drawing every crop and mirror (lib/data.make_plan); the loader only executes the
plan, so para_load True and False train identically. Per step the trainer sends the loader one
small typed control message over a ZeroMQ PAIR socket (never pickle): which split, which file, which
ring slot, and the crop/mirror arrays as raw frames. The loader reads the hkl file, subtracts the
mean, crops and mirrors (or, with use_data_layer, leaves the uint8 batch for the device to prepare)
straight into that slot of a ring of shared-memory buffers, and answers READY. The trainer uses the
slot in place, without a copy through a pipe, and hands it back when it asks for the next batch.

Everything lives in a private (0700) directory, on /dev/shm when there is one: the socket
(ipc://.../ctl) and one file per slot, mapped by both processes; the directory is removed as soon
as the loader has mapped the slots and connected, so processes killed together leave nothing
behind. /dev/shm's free space is checked first (a 64 MB container default is too small).

Lifecycle: the loader exits when told to, when its parent is gone (checked every second), or on
Ctrl-C; the trainer waits for each batch at most `timeout` seconds and checks every 0.2 s that the
loader is alive, then raises LoaderError naming the loader process and the batch file.
"""
import ctypes
import multiprocessing
import os
import shutil
import signal
import struct
import tempfile
import time
from collections import deque

import numpy as np
import torch
import zmq

from lib import SHM, UserError, data

MAGIC, VERSION = b'ALXL', 1
LOAD, STOP, READY, ERROR, HELLO = 1, 2, 3, 4, 5
HEADER = struct.Struct('<4sBBBBI')  # magic, version, kind, split, slot, file index
N_SLOTS = 2
STARTUP_TIMEOUT = 120.0  # seconds for the loader to import torch and open its files
MAX_TEXT = 16384         # bytes of an error text on the wire (longer ones are cut)


class LoaderError(UserError, RuntimeError):
    """The loader process died, stalled, or sent something unexpected."""


class ProtocolError(ValueError):
    """A control message that is not one of ours; it is rejected, never acted on."""


# --- messages ---------------------------------------------------------------------------------
def encode(kind, split=0, slot=0, file=0, step=None):
    frames = [HEADER.pack(MAGIC, VERSION, kind, split, slot, file)]
    if step is not None:
        frames += [step.crop_x.numpy().astype('<i8').tobytes(),
                   step.crop_y.numpy().astype('<i8').tobytes(),
                   step.mirror.numpy().astype(np.uint8).tobytes()]
    return frames


def decode(frames, batch_size=None, n_slots=N_SLOTS, n_files=None):
    """frames -> (kind, split, slot, file, step or None); ProtocolError for anything else."""
    if not frames or len(frames[0]) != HEADER.size:
        raise ProtocolError(f'bad header ({len(frames[0]) if frames else 0} bytes)')
    magic, version, kind, split, slot, file = HEADER.unpack(frames[0])
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f'unknown magic/version {magic!r}/{version}')
    if kind not in (LOAD, STOP, READY, ERROR, HELLO):
        raise ProtocolError(f'unknown message kind {kind}')
    if kind != LOAD:
        if kind == ERROR and len(frames) == 2:
            return kind, split, slot, file, frames[1].decode('utf-8', 'replace')
        if len(frames) != 1:
            raise ProtocolError(f'message kind {kind} with {len(frames)} frames')
        return kind, split, slot, file, None
    if len(frames) != 4 or slot >= n_slots or (n_files is not None and (
            split >= len(n_files) or file >= n_files[split])):
        raise ProtocolError(f'bad LOAD message (frames {len(frames)}, split {split}, slot {slot}, '
                            f'file {file})')
    B = batch_size
    if len(frames[1]) != 8 * B or len(frames[2]) != 8 * B or len(frames[3]) != B:
        raise ProtocolError(f'LOAD arrays are not of batch size {B}')
    cx, cy = (torch.from_numpy(np.frombuffer(f, '<i8').astype(np.int64)) for f in frames[1:3])
    mirror = torch.from_numpy(np.frombuffer(frames[3], np.uint8) != 0)
    return kind, split, slot, file, data.Step(file, cx, cy, mirror)


# --- shared slots -----------------------------------------------------------------------------
def slot_spec(batch_size, image_size, crop_size, raw):
    """(dtype, shape) of one slot: the uint8 c01b batch (raw) or the prepared float32 batch."""
    if raw:
        return np.uint8, (3, image_size, image_size, batch_size)
    return np.float32, (batch_size, 3, crop_size, crop_size)


def map_slots(folder, spec, n_slots, create):
    dtype, shape = spec
    mode = 'w+' if create else 'r+'
    return [torch.from_numpy(np.memmap(os.path.join(folder, f'slot{i}'), dtype, mode, shape=shape))
            for i in range(n_slots)]


def mapped_library(prefix):
    """The path of the first shared library mapped into this process whose file name starts with
    `prefix` (from /proc/self/maps), or None."""
    try:
        with open('/proc/self/maps') as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if path.startswith('/') and os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


def clear_last_cuda_error():
    """cudaGetLastError() in the CUDA runtime that torch loaded, which resets it; returns the
    error it held, or None where that runtime is not found. A failed runtime call (here
    cudaHostRegister) leaves its error as the runtime's last error, which torch's check after its
    next kernel launch would raise as that kernel's; torch.cuda.cudart() binds no
    cudaGetLastError, and dlopen of a library already mapped returns that same instance."""
    path = mapped_library('libcudart.so')
    if path is None:
        return None
    return int(ctypes.CDLL(path).cudaGetLastError())


def shm_free(folder):
    """Bytes free in the file system of folder (/dev/shm: the shared memory left)."""
    return shutil.disk_usage(folder).free


class SlotFeed:
    """How the trainer moves a raw uint8 slot to its device (use_data_layer).

    CPU: the slot itself (crop_mirror reads it in place). CUDA: the slots are page-locked where
    they are (cudaHostRegister on the shared mapping), so each copy is an asynchronous DMA, issued
    on a side stream into one of two device buffers: it overlaps the kernels of the step still
    running, and the compute stream waits for it with an event. A slot goes back to the loader
    only after its copy has finished (release), and a device buffer is refilled only after the
    kernels that read it ran (consumed). Where registration fails (e.g. a sandbox without it),
    the copies are plain synchronous ones, with a notice."""

    def __init__(self, slots, device):
        self.slots, self.device = slots, device
        self.cuda = device.type == 'cuda'
        self.registered, self.error = [], None  # error: cudaHostRegister's, where it refused
        if not self.cuda:
            return
        cudart = torch.cuda.cudart()
        for t in slots:
            err = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
            if err:
                self.error = err
                clear_last_cuda_error()  # not left for the next kernel launch to report as its own
                print(f'notice: cudaHostRegister of the loader slots failed (cudaError {err}); '
                      'host-to-device copies are synchronous', flush=True)
                break
            self.registered.append(t.data_ptr())
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in slots]
        self.copied = [torch.cuda.Event() for _ in slots]
        self.used = [None] * len(slots)

    @property
    def pinned(self):
        return self.cuda and len(self.registered) == len(self.slots)

    def to_device(self, k):
        """Slot k's batch on the device (valid until consumed(k) and the next to_device(k))."""
        if not self.cuda:
            return self.slots[k].to(self.device)  # the slot itself on the CPU
        with torch.cuda.stream(self.stream):
            if self.used[k] is not None:  # the kernels that read this buffer last time ran
                self.stream.wait_event(self.used[k])
            self.buffers[k].copy_(self.slots[k], non_blocking=self.pinned)
            self.copied[k].record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[k])
        return self.buffers[k]

    def consumed(self, k):
        """The kernels that read buffer k are queued on the compute stream."""
        if self.cuda:
            self.used[k] = torch.cuda.Event()
            self.used[k].record(torch.cuda.current_stream(self.device))

    def release(self, k):
        """Before slot k goes back to the loader: its copy to the device has finished."""
        if self.cuda:
            self.copied[k].synchronize()

    def close(self):
        if self.registered:
            torch.cuda.synchronize(self.device)
            cudart = torch.cuda.cudart()
            for ptr in self.registered:
                cudart.cudaHostUnregister(ptr)
            self.registered = []


# --- the loader process -------------------------------------------------------------------------
def loader_main(job):
    """Entry point of the loader process. `job` holds only plain values (paths, sizes)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C: just stop, no traceback
    torch.set_num_threads(1)                      # leave the cores to the trainer
    sources = [data.BatchFolder(**spec) for spec in job['sources']]
    mean = data.load_mean(job['mean_file'], job['image_size'])
    slots = map_slots(job['dir'], slot_spec(job['batch_size'], job['image_size'], job['crop_size'],
                                            job['raw']), job['n_slots'], create=False)
    buffers = data.HostBuffers()  # the transposed batch's scratch; crops go straight to a slot
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, max(8 * job['batch_size'], HEADER.size))  # LOAD's largest frame
    sock.connect(job['endpoint'])
    sock.send_multipart(encode(HELLO))
    n_files = [len(s) for s in sources]
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != job['parent']:  # the trainer is gone: do not outlive it,
                    shutil.rmtree(job['dir'], ignore_errors=True)  # nor leave its slots in RAM
                    return
                continue
            frames = sock.recv_multipart()
            try:
                kind, split, slot, file, step = decode(frames, job['batch_size'], job['n_slots'],
                                                       n_files)
            except ProtocolError as e:
                sock.send_multipart(encode(ERROR) + [f'rejected control message: {e}'.encode()[:MAX_TEXT]])
                continue
            if kind == STOP:
                return
            if kind != LOAD:
                sock.send_multipart(encode(ERROR) + [b'rejected control message: not a request'])
                continue
            try:
                if job['raw']:  # the file's bytes straight into the slot, no array between
                    sources[split].read_into(file, slots[slot].numpy())
                else:
                    data.crop_mirror(torch.from_numpy(sources[split].read(file)), mean, step,
                                     job['crop_size'], out=slots[slot], buffers=buffers)
            except (data.DataError, OSError) as e:
                sock.send_multipart(encode(ERROR, split, slot, file) + [str(e).encode()[:MAX_TEXT]])
                continue
            sock.send_multipart(encode(READY, split, slot, file))
    finally:
        sock.close()
        ctx.term()


# --- the trainer's side -----------------------------------------------------------------------
class LoaderProcess:
    """One loader process serving the train and val sources of one trainer."""

    def __init__(self, sources, mean_file, crop_size, device, on_device=False, timeout=60.0,
                 port=None):
        self.sources, self.crop_size, self.timeout = sources, crop_size, timeout
        self.device, self.on_device = torch.device(device), on_device
        self.image_size = sources[0].image_size()
        mean = data.load_mean(mean_file, self.image_size)  # checked here: errors name the file
        self.mean = mean.to(self.device) if on_device else None
        spec = slot_spec(sources[0].batch_size, self.image_size, crop_size, on_device)
        need = N_SLOTS * np.dtype(spec[0]).itemsize * int(np.prod(spec[1]))
        folder = SHM or tempfile.gettempdir()
        free = shm_free(folder)
        if free < need:  # else the loader dies of SIGBUS (exit code -7) when a slot fills up
            raise LoaderError(f'para_load needs {need / 2**20:.1f} MiB of shared memory for its '
                              f'{N_SLOTS} slots, {folder} has {free / 2**20:.1f} MiB free '
                              f'(enlarge it, e.g. docker --shm-size, or set para_load=False)')
        self.dir = tempfile.mkdtemp(prefix='alexnet-loader-', dir=folder)  # mode 0700
        self.slots = map_slots(self.dir, spec, N_SLOTS, create=True)
        self.feed = SlotFeed(self.slots, self.device) if on_device else None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_TEXT)  # the loader's largest frame: an error text
        self.sock.setsockopt(zmq.SNDTIMEO, int(1000 * timeout))
        if zmq.has('ipc'):
            endpoint = f'ipc://{self.dir}/ctl'
            self.sock.bind(endpoint)
        else:  # no unix sockets (Windows): loopback only, never every interface
            try:
                self.sock.bind(f'tcp://127.0.0.1:{port}')
            except zmq.ZMQError as e:
                self.close()
                raise LoaderError(f'cannot bind the loader socket 127.0.0.1:{port} '
                                  f'(sock_data): {e}') from None
            endpoint = f'tcp://127.0.0.1:{port}'
        job = dict(sources=[s.spec() for s in sources],
                   batch_size=sources[0].batch_size, image_size=self.image_size,
                   crop_size=crop_size, raw=on_device, mean_file=mean_file, dir=self.dir,
                   n_slots=N_SLOTS, endpoint=endpoint, parent=os.getpid())
        self.proc = multiprocessing.get_context('spawn').Process(
            target=loader_main, args=(job,), name='alexnet-loader', daemon=True)
        self.proc.start()
        self.busy = False
        self._wait_hello(max(timeout, STARTUP_TIMEOUT))

    def _wait_hello(self, timeout):
        """The loader is up (imports done, files opened) or an error says why not."""
        deadline = time.monotonic() + timeout
        while not self.sock.poll(200):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.close()
                raise LoaderError(f'loader process (pid {self.proc.pid}) did not start '
                                  f'(exit code {self.proc.exitcode}) within {timeout:g} s')
        kind = decode(self.sock.recv_multipart())[0]
        if kind != HELLO:
            self.close()
            raise LoaderError(f'loader process (pid {self.proc.pid}) sent kind {kind} first')
        # both processes have mapped the slots and connected: nothing needs the names any more,
        # so nothing is left in /dev/shm when both are killed (the memory goes with the mappings)
        shutil.rmtree(self.dir, ignore_errors=True)

    def loader(self, split):
        return ProcessLoader(self, split)

    def _wait(self, slot, split, file):
        """Block until the loader says slot holds (split, file); errors name the file."""
        path = self.sources[split].files[file]
        deadline = time.monotonic() + self.timeout
        while True:
            if self.sock.poll(200):
                kind, r_split, r_slot, r_file, text = decode(self.sock.recv_multipart())
                if kind == ERROR:
                    raise data.DataError(text)
                if (kind, r_split, r_slot, r_file) != (READY, split, slot, file):
                    raise LoaderError(f'loader process (pid {self.proc.pid}) answered slot '
                                      f'{r_slot} file {r_file}, expected {path}')
                return
            if not self.proc.is_alive():
                raise LoaderError(f'loader process (pid {self.proc.pid}) died (exit code '
                                  f'{self.proc.exitcode}) while preparing {path}')
            if time.monotonic() > deadline:
                raise LoaderError(f'loader process (pid {self.proc.pid}) stalled: no batch for '
                                  f'{self.timeout:g} s (loader_timeout) while preparing {path}')

    def _send(self, frames, split, file):
        try:
            self.sock.send_multipart(frames)
        except zmq.Again:  # SNDTIMEO: the connection is gone (e.g. reset for an oversized frame)
            raise LoaderError(f'loader process (pid {self.proc.pid}) did not take the request for '
                              f'{self.sources[split].files[file]} within {self.timeout:g} s '
                              f'(loader_timeout): its connection was lost') from None

    def close(self):
        if getattr(self, 'proc', None) is not None and self.proc.is_alive():
            try:
                self.sock.send_multipart(encode(STOP), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        if getattr(self, 'feed', None) is not None:
            self.feed.close()
        if getattr(self, 'sock', None) is None:  # stopped before anything was made
            return
        if not self.sock.closed:
            self.sock.close()
            self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self):
        self.close()


class ProcessLoader:
    """The batch iterator of one split, served by a LoaderProcess (same interface as
    data.InProcessLoader: epoch(plan) yields (images, labels) on the device; close())."""

    def __init__(self, process, split):
        self.process, self.split = process, split
        # seconds next() spent waiting for the previous batch's device copy to finish before its
        # slot goes back (use_data_layer on CUDA): that copy queues behind the compute of two
        # steps back, so this is the device's back-pressure, not the loader being late
        self.copy_wait = 0.0
        self.source = process.sources[split]
        self.batch_size = self.source.batch_size
        self.image_size = process.image_size

    def __len__(self):
        return len(self.source)

    def epoch(self, plan):
        p, split = self.process, self.split
        if p.busy:
            raise LoaderError('the loader process serves one epoch at a time')
        p.busy = True
        steps, pending = iter(plan), deque()

        def request(slot):
            step = next(steps, None)
            if step is not None:
                p._send(encode(LOAD, split, slot, step.file, step), split, step.file)
                pending.append((slot, step))

        try:
            for slot in range(N_SLOTS):
                request(slot)
            while pending:
                slot, step = pending.popleft()
                p._wait(slot, split, step.file)
                buf = p.slots[slot]
                if p.on_device:   # uint8 batch: mean, crop and mirror on the device
                    x = data.crop_mirror(p.feed.to_device(slot), p.mean, step, p.crop_size)
                    p.feed.consumed(slot)
                else:             # prepared float32 batch, used in place on the CPU
                    x = buf if p.device.type == 'cpu' else buf.to(p.device)
                y = torch.from_numpy(self.source.labels[step.file])
                if p.device.type == 'cuda':  # a pageable copy would wait for the GPU to drain
                    y = y.pin_memory().to(p.device, non_blocking=True)
                y = y.to(p.device)
                yield x, y        # valid until the next batch is asked for
                if p.on_device:
                    t = time.perf_counter()
                    p.feed.release(slot)
                    self.copy_wait += time.perf_counter() - t
                request(slot)     # the trainer is done with this slot: refill it
        finally:
            # an epoch cut short: let the loads in flight land before the slots are reused
            while pending:
                slot, step = pending.popleft()
                try:
                    p._wait(slot, split, step.file)
                except (LoaderError, data.DataError):
                    break
            if p.on_device:  # no copy from a slot is in flight when the next epoch refills it
                for slot in range(N_SLOTS):
                    p.feed.release(slot)
            p.busy = False

    def close(self):
        self.process.close()
