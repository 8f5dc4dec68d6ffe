"""The test cluster (benchmarks/cluster.py: "hosts" made of Linux network namespaces on one
bridge; needs root) as a fixture: everything made (namespaces, links, processes in them) is
removed when the fixture ends, also when a test fails.

    def test_x(cluster):
        a, b = cluster(2)                      # Host objects: .name, .addr
        p = a.popen([sys.executable, ...])     # a process on host a (same filesystem)
        b.link(False); b.link(True)            # cut / restore b's link
        b.rate('1gbit')                        # tbf rate limit on b's link (both directions)

Under CI=true a cluster that cannot be made is a test failure; elsewhere the test is skipped
with the reason.
"""
import os
import subprocess

import pytest

from benchmarks.cluster import Cluster


@pytest.fixture
def cluster():
    """cluster(n) -> n Hosts on one bridge, removed (with their processes) after the test."""
    made = []

    def build(n):
        c = Cluster()
        made.append(c)
        try:
            return c.build(n)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            c.close()
            made.remove(c)
            if os.environ.get('CI') == 'true':
                pytest.fail(f'cannot build the test cluster: {e}')
            pytest.skip(f'cannot build the test cluster (needs root and ip netns): {e}')
    yield build
    for c in made:
        c.close()
