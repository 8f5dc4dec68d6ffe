"""A cluster on one machine: "hosts" made of Linux network namespaces, each with its own address,
joined by a bridge in a namespace of its own. Needs root (`ip netns`); nothing is addressed outside
the namespaces made here, and Cluster.close() removes everything made (namespaces, links, the
processes in them). The tests' cluster (tests/cluster.py) and benchmarks/links.py build on it.

    cluster = Cluster()
    a, b = cluster.build(2)                # Host objects: .name, .addr
    p = a.popen([sys.executable, ...])     # a process on host a (same filesystem)
    b.link(False); b.link(True)            # cut / restore b's link
    b.rate('1gbit')                        # tbf rate limit on b's link (both directions)
    cluster.close()
"""
import os
import signal
import subprocess
import time
import uuid

SUBNET = '10.77.0'


def ip(*args, check=True):
    """ip's output; with check=False, '' where it fails (or is missing: clean-up goes on)."""
    try:
        r = subprocess.run(['ip', *args], capture_output=True, text=True, timeout=30)
    except OSError:
        if check:
            raise
        return ''
    if check and r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class Host:
    def __init__(self, ns, hub, port, addr):
        self.name, self.hub, self.port, self.addr = ns, hub, port, addr

    def popen(self, cmd, **kw):
        """A process in this host's network namespace (ip netns exec replaces itself with cmd,
        so .pid is cmd's)."""
        return subprocess.Popen(['ip', 'netns', 'exec', self.name, *cmd], **kw)

    def run(self, cmd, **kw):
        return subprocess.run(['ip', 'netns', 'exec', self.name, *cmd], **kw)

    def link(self, up):
        """Cut (False) or restore (True) this host's link to the others; nothing is sent or
        refused, packets are lost, as when a cable is pulled."""
        ip('-n', self.hub, 'link', 'set', self.port, 'up' if up else 'down')

    def rate(self, rate):
        """Limit this host's link to `rate` (tc syntax, '1gbit'), both directions; None: no limit."""
        for ns, dev in ((self.name, 'eth0'), (self.hub, self.port)):
            subprocess.run(['ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'del', 'dev', dev, 'root'],
                           capture_output=True, timeout=30)
            if rate:
                # a burst of 1 ms of traffic (at least 1 MB) keeps tbf from capping below `rate`
                burst = max(1 << 20, int(rate_bits(rate) / 8 / 1000))
                r = subprocess.run(['ip', 'netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', dev,
                                    'root', 'tbf', 'rate', rate, 'burst', str(burst),
                                    'latency', '50ms'], capture_output=True, text=True, timeout=30)
                if r.returncode:
                    raise RuntimeError(f'tc tbf {rate} on {ns}/{dev}: {r.stderr.strip()}')

    def pids(self):
        return [int(p) for p in ip('netns', 'pids', self.name, check=False).split()]


def rate_bits(rate):
    units = {'kbit': 1e3, 'mbit': 1e6, 'gbit': 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise ValueError(f'rate {rate!r}: expected N kbit / mbit / gbit')


class Cluster:
    def __init__(self):
        self.tag = 'ax' + uuid.uuid4().hex[:6]  # unique: other test runs may build theirs now
        self.hub = f'{self.tag}hub'
        self.namespaces = []
        self.hosts = []

    def build(self, n):
        self.namespaces.append(self.hub)
        ip('netns', 'add', self.hub)
        ip('-n', self.hub, 'link', 'add', 'br0', 'type', 'bridge')
        ip('-n', self.hub, 'link', 'set', 'br0', 'up')
        for i in range(n):
            ns, port = f'{self.tag}h{i}', f'p{i}'
            self.namespaces.append(ns)
            ip('netns', 'add', ns)
            ip('link', 'add', 'eth0', 'netns', ns, 'type', 'veth', 'peer', 'name', port,
               'netns', self.hub)
            ip('-n', self.hub, 'link', 'set', port, 'master', 'br0', 'up')
            addr = f'{SUBNET}.{i + 1}'
            ip('-n', ns, 'addr', 'add', f'{addr}/24', 'dev', 'eth0')
            ip('-n', ns, 'link', 'set', 'eth0', 'up')
            ip('-n', ns, 'link', 'set', 'lo', 'up')
            self.hosts.append(Host(ns, self.hub, port, addr))
        return self.hosts

    def close(self):
        """Kill every process left in the namespaces, then remove them (and with them the links)."""
        for ns in self.namespaces:
            for pid in (int(p) for p in ip('netns', 'pids', ns, check=False).split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.namespaces:
            for _ in range(50):  # a killed process may hold the namespace a moment longer
                if not ip('netns', 'pids', ns, check=False).split():
                    break
                time.sleep(0.1)
            ip('netns', 'del', ns, check=False)
