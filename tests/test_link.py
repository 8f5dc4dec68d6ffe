"""lib/link.py: the hello, who may connect (a socket only this user can reach on one host; CURVE
keys between hosts), the frame size cap."""
import os
import socket
import threading
import time

import pytest
import torch
import zmq

from lib import exchange, link
from tests.helpers import (FAKE_IPC_INFO, answer_of_a_fresh_process, both_workers, fake_cuda,
                           refuse_page_locking)
from tests.test_train_2gpu import free_port


def fake_worker0(port, keys, seen, ready):
    """A process that bound sock_gpu first without worker 0's secret key (no key, or a key pair
    of its own): it answers any hello with a CUDA IPC handle of its choosing."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    if keys == 'own key pair':
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.curve_server = True
    s.bind(f'tcp://127.0.0.1:{port}')
    ready.set()
    info = b'{"rank": 0, "numel": 10, "transport": "ipc", "dtype": "torch.float32", "ipc": {"handle": "00"}}'
    try:
        while s.poll(6000):
            ident, *frames = s.recv_multipart()
            seen.extend(frames)
            s.send_multipart([ident, link.header(link.HELLO, 0), info])
    finally:
        s.close()
        ctx.term()


@pytest.mark.parametrize('keys', ['no key', 'own key pair'])
def test_worker1_refuses_a_server_that_cannot_prove_the_secret(tmp_path, keys, monkeypatch):
    """Between hosts the secret is worker 0's CURVE key: worker 1 talks only to its holder, so a
    server that bound the port first hears nothing from worker 1 (not even its hello) and the
    handle it offers is never opened; worker 1 stops at peer_timeout."""
    port, seen, ready = free_port(), [], threading.Event()
    t = threading.Thread(target=fake_worker0, args=(port, keys, seen, ready))
    t.start()
    ready.wait(10)
    opened = []
    monkeypatch.setattr(exchange, 'ipc_share', lambda flat: {'handle': 'ff'})
    monkeypatch.setattr(exchange, 'ipc_open', lambda info: opened.append(info))
    pair = exchange.Pair(1, 'ipc', f'tcp://127.0.0.1:{port}', timeout=3.0,
                         curve_dir=curve_dir(tmp_path))
    p = torch.nn.Parameter(torch.zeros(5))
    try:
        with pytest.raises(exchange.PeerError, match=rf'worker 0 did not connect to '
                                                     rf'tcp://127.0.0.1:{port} within 3 s'):
            pair.attach([p], [torch.zeros(5)], torch.device('cpu'))
    finally:
        pair.close()
        t.join(30)
    assert opened == [] and seen == []


def run_pair(endpoint, infos, max_frame=None, before=None):
    """Both ends' handshakes at once (helpers.both_workers): ([info of rank 0, of rank 1], links)."""
    links = [link.Link(r, endpoint, 10.0, max_frame=max_frame) for r in (0, 1)]
    if before:
        before()
    try:
        out = both_workers(lambda r: links[r].handshake(infos[r]), 30)
    except BaseException:
        for lk in links:
            lk.close()
        raise
    return [out[0], out[1]], links


def test_a_peer_that_is_connected_but_silent_is_named_at_peer_timeout(tmp_path):
    """The peer process alive (its ZeroMQ heartbeats answered) but sending nothing, e.g. stuck
    in its own step: only peer_timeout ends the wait, naming the peer."""
    links, waiter = [link.Link(r, f'ipc://{tmp_path}/link', 1.5) for r in (0, 1)], None
    try:
        both_workers(lambda r: links[r].handshake({}), 30)
        got = []

        def wait():
            try:
                links[1].recv(link.DATA, 7)
            except link.PeerError as e:
                got.append(str(e))
        t0 = time.monotonic()
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(8)
        elapsed = time.monotonic() - t0
        assert got and 'worker 0 did not answer within 1.5 s (peer_timeout)' in got[0], (got, elapsed)
        assert 1.5 <= elapsed < 10
    finally:
        if not (waiter and waiter.is_alive()):  # (a socket is closed by the thread that uses it)
            for lk in links:
                lk.close()


def test_both_sides_exchange_infos(tmp_path):
    out, links = run_pair(f'ipc://{tmp_path}/link', [{'a': 0}, {'b': 1}])
    try:
        assert out == [{'b': 1}, {'a': 0}]
        assert links[0].peer_id is not None and links[0].rejected == 0
    finally:
        for lk in links:
            lk.close()


def test_worker0_drops_clients_that_are_not_worker1_and_waits_for_it(tmp_path):
    """A client that sends garbage, or a hello in worker 0's place, is rejected (and hears
    nothing); worker 1, connecting after it, is the peer."""
    endpoint, out = f'ipc://{tmp_path}/link', {}
    server = link.Link(0, endpoint, 15.0)
    t = threading.Thread(target=lambda: out.update(s=server.handshake({'a': 0})))
    t.start()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    client = None
    try:
        rogue.connect(endpoint)
        rogue.send_multipart([b'garbage'])
        rogue.send_multipart([link.header(link.HELLO, 0), b'{"rogue": 1}'])
        deadline = time.monotonic() + 5
        while server.rejected < 2 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.05)
        client = link.Link(1, endpoint, 5.0)
        out['c'] = client.handshake({'b': 1})
        t.join(30)
        assert out == {'s': {'b': 1}, 'c': {'a': 0}}
        assert server.rejected == 2
        assert not rogue.poll(500)  # no hello for the rogue
    finally:
        rogue.close()
        ctx.term()
        t.join(30)
        for lk in (client, server):
            if lk is not None:
                lk.close()


def test_frames_over_the_cap_are_dropped_before_the_handshake_reads_them(tmp_path):
    endpoint = f'ipc://{tmp_path}/link'
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)

    def flood():
        intruder.connect(endpoint)
        intruder.send_multipart([link.header(link.HELLO, 1), b'x' * (link.MIN_FRAME + 2000)])
    out, links = run_pair(endpoint, [{'a': 0}, {'b': 1}], max_frame=1000, before=flood)
    try:
        assert out == [{'b': 1}, {'a': 0}]
        assert links[0].rejected == 0  # the oversized hello never reached the handshake
    finally:
        intruder.close()
        ctx.term()
        for lk in links:
            lk.close()


# --- CURVE (two hosts) --------------------------------------------------------------------------

def curve_dir(tmp_path):
    from zmq.auth import create_certificates
    d = tmp_path / 'keys'
    d.mkdir()
    for r in (0, 1):
        create_certificates(str(d), f'worker{r}')
    return str(d)


class Relay:
    """A plain TCP relay between worker 1 and worker 0 that keeps every byte it forwards: what a
    host on the path between two machines sees."""

    def __init__(self, target_port):
        import socket
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port, self.target, self.seen = self.listener.getsockname()[1], target_port, bytearray()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        import socket
        try:
            a, _ = self.listener.accept()
        except OSError:
            return
        b = socket.create_connection(('127.0.0.1', self.target))
        for src, dst in ((a, b), (b, a)):
            t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
            t.start()
            self.threads.append(t)

    def _pump(self, src, dst):
        try:
            while chunk := src.recv(1 << 16):
                self.seen += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize('curve', [False, True])
def test_curve_encrypts_everything_on_the_wire(tmp_path, curve):
    """Through a relay that records the bytes: with curve_dir, neither the hellos' JSON nor the
    exchange data can be read there; without, both can (which shows the relay sees them)."""
    port, keys = free_port(), curve_dir(tmp_path) if curve else ''
    relay = Relay(port)
    server = link.Link(0, f'tcp://127.0.0.1:{port}', 10.0, keys, max_frame=4096)
    client = link.Link(1, f'tcp://127.0.0.1:{relay.port}', 10.0, keys, max_frame=4096)
    marker = b'plaintext-marker-' * 64
    out = {}
    try:
        t = threading.Thread(target=lambda: out.update(c=client.handshake({'who': 'secret-info-1'})))
        t.start()
        out['s'] = server.handshake({'who': 'secret-info-0'})
        t.join(30)
        assert out == {'s': {'who': 'secret-info-1'}, 'c': {'who': 'secret-info-0'}}
        server.send(link.DATA, 1, marker)
        assert client.recv(link.DATA, 1) == [marker]
        client.send(link.DATA, 2, marker)
        assert server.recv(link.DATA, 2) == [marker]
    finally:
        client.close()
        server.close()
        relay.close()
    wire = bytes(relay.seen)
    assert len(wire) > 2 * len(marker)
    for plain in (marker[:64], b'secret-info-0', b'secret-info-1', b'ALXW'):
        assert (plain in wire) == (not curve), plain


def test_curve_refuses_clients_without_the_right_key(tmp_path):
    """A client with no key, with a key pair of its own, or with worker 1's public key but another
    secret key never reaches worker 0's handshake (nothing answered, nothing rejected: ZeroMQ's
    CURVE handshake and authenticator drop it); worker 1 then connects as usual."""
    from zmq.auth import load_certificate
    port, keys = free_port(), curve_dir(tmp_path)
    server = link.Link(0, f'tcp://127.0.0.1:{port}', 15.0, keys, max_frame=4096)
    server_public, _ = load_certificate(os.path.join(keys, 'worker0.key'))
    worker1_public, _ = load_certificate(os.path.join(keys, 'worker1.key'))
    ctx = zmq.Context()
    intruders = []
    for how in ('no key', 'own key pair', "worker 1's public key, another secret"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if how != 'no key':
            public, secret = zmq.curve_keypair()
            s.curve_publickey = worker1_public if how.startswith('worker 1') else public
            s.curve_secretkey, s.curve_serverkey = secret, server_public
        s.connect(f'tcp://127.0.0.1:{port}')
        s.send_multipart([link.header(link.HELLO, 1), b'{"rogue": 1}'], zmq.NOBLOCK)
        intruders.append((how, s))
    out = {}
    client = link.Link(1, f'tcp://127.0.0.1:{port}', 15.0, keys, max_frame=4096)
    try:
        time.sleep(1.0)  # the intruders' hellos are on their way before worker 1's
        t = threading.Thread(target=lambda: out.update(c=client.handshake({'b': 1})))
        t.start()
        out['s'] = server.handshake({'a': 0})
        t.join(30)
        assert out == {'s': {'b': 1}, 'c': {'a': 0}}
        assert server.rejected == 0  # no intruder's message reached the application
        for how, s in intruders:
            assert not s.poll(500), f'a client with {how} got an answer'
    finally:
        for _, s in intruders:
            s.close()
        ctx.term()
        client.close()
        server.close()


def open_with_fake_cuda(info, out):
    calls = fake_cuda(info['numel'])
    try:
        t = exchange.ipc_open(info)
        out.put((calls, str(t.dtype), tuple(t.shape), bool((t == 7).all())))
    except Exception as e:  # noqa: BLE001 -- the test's answer, at once
        out.put((calls, repr(e)))


def test_ipc_open_initialises_cuda_in_a_fresh_process_before_opening_the_handle():
    """Worker 1 opens worker 0's CUDA IPC handle before it has touched CUDA itself (CUDA faked:
    the real one crashes the process then): a tensor of the handle's dtype and size on it."""
    got = answer_of_a_fresh_process(open_with_fake_cuda, FAKE_IPC_INFO)
    assert got == (['_lazy_init', '_new_shared_cuda'], 'torch.uint8', (1 << 10,), True)


def test_a_refused_pinned_host_buffer_falls_back_to_pageable_memory(monkeypatch, capsys):
    """The tcp exchange's host buffer is page-locked where CUDA is; a platform that refuses
    gets pageable memory and one notice naming the refusal."""
    buf, refusal = exchange.host_buffer(10, torch.float32)  # no CUDA: pageable, nothing refused
    assert buf.shape == (10,) and buf.dtype == torch.float32 and not buf.is_pinned() and refusal is None
    refuse_page_locking(monkeypatch)
    buf, refusal = exchange.host_buffer(250_000, torch.float64)
    assert buf.shape == (250_000,) and buf.dtype == torch.float64
    assert refusal == 'CUDA error: operation not supported'
    assert capsys.readouterr().out == ('notice: page-locking 2 MB of host memory for the exchange '
                                       'was refused (CUDA error: operation not supported); it '
                                       'uses pageable memory\n')


def test_chunks_cut_a_range_into_pieces_of_at_most_the_size():
    assert exchange.chunks(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert exchange.chunks(6, 14, 4) == [(6, 10), (10, 14)] and exchange.chunks(3, 3, 4) == []


def test_ipc_share_describes_what_ipc_open_opens(monkeypatch):
    """Worker 0's description of its buffer (JSON, over the link) gives worker 1 a tensor of the
    same storage, offset, size and dtype (CUDA faked: each side's torch call is checked)."""
    import json
    shared = (0, bytes(range(64)), 4096, 512, b'ref-' * 4, 8, b'evt-' * 16, True)

    class Storage:
        def _share_cuda_(self):
            return shared

    class Flat:
        dtype = torch.float32

        def untyped_storage(self):
            return Storage()

        def storage_offset(self):
            return 3

        def numel(self):
            return 100
    info = json.loads(json.dumps(exchange.ipc_share(Flat())))
    opened = []

    def new_shared_cuda(device, handle, size, offset, ref, ref_offset, event, event_sync):
        opened.append((device, handle, size, offset, ref, ref_offset, event, event_sync))
        return torch.zeros(1024, dtype=torch.float32).untyped_storage()
    monkeypatch.setattr(torch.cuda, '_lazy_init', lambda: None)
    monkeypatch.setattr(torch.UntypedStorage, '_new_shared_cuda', staticmethod(new_shared_cuda))
    t = exchange.ipc_open(info)
    assert opened == [shared]
    assert (t.dtype, tuple(t.shape), t.storage_offset()) == (torch.float32, (100,), 3)


def test_a_message_of_another_size_is_named_with_its_sizes_and_place(tmp_path):
    _, links = run_pair(f'ipc://{tmp_path}/link', [{}, {}])
    try:
        links[0].send(link.DATA, 7, b'abc')
        with pytest.raises(link.ExchangeError, match=r'^worker 0 sent 3 bytes at message 7, expected 8$'):
            links[1].recv(link.DATA, 7, into=bytearray(8))
        links[1].step = 12  # in training: the step
        links[1].send(link.DATA, 8, b'abcdefghi')
        with pytest.raises(link.ExchangeError, match=r'^worker 1 sent 9 bytes at message 8, expected 8$'):
            links[0].recv(link.DATA, 8, into=bytearray(8))
        links[0].step = 3
        links[1].send(link.DATA, 9, b'ab')
        with pytest.raises(link.ExchangeError, match=r'^worker 1 sent 2 bytes at step 3, expected 8$'):
            links[0].recv(link.DATA, 9, into=bytearray(8))
    finally:
        for lk in links:
            lk.close()


def test_worker1_names_a_hello_that_is_not_worker0s(tmp_path):
    """Whatever answers worker 1's hello with another message is named, with what it sent."""
    address = f'ipc://{tmp_path}/link'
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(address)
    worker1 = link.Link(1, address, 10.0)
    try:
        answered = threading.Thread(target=lambda: server.send_multipart(
            [server.recv_multipart()[0], link.header(link.DATA, 0), b'{}']), daemon=True)
        answered.start()
        with pytest.raises(link.ExchangeError, match=rf'^worker 0 sent a malformed hello on {address}: '
                                                     r'expected the hello of worker 0, got data 0 in 2 frames$'):
            worker1.handshake({})
        answered.join(10)
    finally:
        worker1.close()
        server.close()
        ctx.term()


def test_a_socket_that_cannot_be_bound_is_named_with_the_keys_that_set_it(tmp_path):
    """tcp: exchange_host and sock_gpu make the address; the launcher's own ipc folder none."""
    missing = f'ipc://{tmp_path}/gone/link'
    with pytest.raises(link.ExchangeError, match=rf'^cannot bind the exchange socket {missing}: '
                                                 r'No such file or directory$'):
        link.Link(0, missing, 1.0)
    port = free_port()
    held = socket.socket()
    held.bind(('127.0.0.1', port))
    held.listen()
    try:
        with pytest.raises(link.ExchangeError, match=rf'^cannot bind the exchange socket tcp://127.0.0.1:'
                                                     rf'{port} \(exchange_host, sock_gpu\): Address '
                                                     r'already in use$'):
            link.Link(0, f'tcp://127.0.0.1:{port}', 1.0)
    finally:
        held.close()

