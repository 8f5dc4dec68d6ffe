"""lib/link.py's handshake: mutual challenge-response (neither side trusts a peer that cannot
prove the secret, the secret never on the wire) and the frame size cap."""
import os
import threading

import pytest
import torch
import zmq

from lib import exchange, link
from tests.test_train_2gpu import free_port

TOKEN = bytes(range(32))


def fake_worker0(port, forge, seen, ready):
    """A process that bound sock_gpu first, without the secret: it answers worker 1's hello
    either by replaying worker 1's own frames back or with a forged proof, and offers a CUDA IPC
    handle of its choosing."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(f'tcp://127.0.0.1:{port}')
    ready.set()
    info = b'{"rank": 0, "numel": 10, "transport": "ipc", "ipc": {"handle": "00"}}'
    try:
        if s.poll(20000):
            ident, *frames = s.recv_multipart()
            seen.extend(frames)
            if forge:
                s.send_multipart([ident, link.header(link.HELLO, 1), os.urandom(32), os.urandom(32)])
                s.send_multipart([ident, link.header(link.HELLO, 3), os.urandom(32), info])
            else:
                s.send_multipart([ident] + frames[:-1] + [info] if len(frames) == 3 else [ident] + frames)
            s.poll(2000)
    finally:
        s.close()
        ctx.term()


@pytest.mark.parametrize('forge', [False, True])
def test_worker1_refuses_a_server_that_cannot_prove_the_secret(forge, monkeypatch):
    port, seen, ready = free_port(), [], threading.Event()
    t = threading.Thread(target=fake_worker0, args=(port, forge, seen, ready))
    t.start()
    ready.wait(10)
    opened = []
    monkeypatch.setattr(exchange, 'ipc_share', lambda flat: {'handle': 'ff'})
    monkeypatch.setattr(exchange, 'ipc_open', lambda info: opened.append(info))
    cfg = dict(exchange_freq=1, peer_timeout=10.0, exchange_host='', sock_gpu=port, curve_dir='')
    pair = exchange.Pair(1, cfg, TOKEN, 'ipc')
    p = torch.nn.Parameter(torch.zeros(5))
    try:
        with pytest.raises(exchange.ExchangeError, match=rf'exchange server at 127.0.0.1:{port} is '
                                                         r'not worker 0: .*bound the port first'):
            pair.attach([p], [torch.zeros(5)], torch.device('cpu'))
    finally:
        pair.close()
        t.join(30)
    assert opened == []                                   # never opened the handle it was offered
    assert seen and all(TOKEN not in f for f in seen)    # and never sent the secret


def run_pair(port, tokens, infos, max_frame=None, before=None):
    """Both ends' handshakes in threads: [(info or exception)] for rank 0 and 1."""
    out = [None, None]
    links = [link.Link(r, '127.0.0.1', port, tokens[r], 10.0, max_frame=max_frame) for r in (0, 1)]
    if before:
        before()

    def go(r):
        try:
            out[r] = links[r].handshake(infos[r])
        except Exception as e:  # noqa: BLE001  (handed to the test)
            out[r] = e
    threads = [threading.Thread(target=go, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out, links


def test_both_sides_prove_the_secret_and_exchange_infos():
    out, links = run_pair(free_port(), [TOKEN, TOKEN], [{'a': 0}, {'b': 1}])
    try:
        assert out == [{'b': 1}, {'a': 0}]
        assert links[0].peer_id is not None and links[0].rejected == 0
    finally:
        for lk in links:
            lk.close()


def test_worker1_with_the_wrong_secret_is_refused_by_worker0_too():
    out, links = run_pair(free_port(), [TOKEN, bytes(32)], [{'a': 0}, {'b': 1}])
    try:
        assert isinstance(out[1], exchange.ExchangeError) and 'not worker 0' in str(out[1])
        assert isinstance(out[0], exchange.PeerError)      # worker 0 waited past it, in vain
        assert links[0].peer_id is None
    finally:
        for lk in links:
            lk.close()


def test_frames_over_the_cap_are_dropped_before_the_handshake_reads_them():
    port = free_port()
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)

    def flood():
        intruder.connect(f'tcp://127.0.0.1:{port}')
        intruder.send_multipart([link.header(link.HELLO, 0), b'x' * (link.MIN_FRAME + 2000)])
    out, links = run_pair(port, [TOKEN, TOKEN], [{'a': 0}, {'b': 1}], max_frame=1000, before=flood)
    try:
        assert out == [{'b': 1}, {'a': 0}]
        assert links[0].rejected == 0  # the oversized hello never reached the handshake
    finally:
        intruder.close()
        ctx.term()
        for lk in links:
            lk.close()
