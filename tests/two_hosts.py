"""Two hosts of our own on this machine, for the paths a single host cannot test: nodeA (10.77.0.1) and nodeB
(10.77.0.2), each a network namespace with its own loopback, address and host name, joined by a bridge, each
running a real sshd (Debian's openssh-server). Ranks on nodeB that rendezvous on "127.0.0.1" reach their own
loopback and wait, as on a real cluster. Host names resolve through /etc/hosts; ssh finds the key through a
drop-in in /etc/ssh/ssh_config.d, as a user's ~/.ssh/config would. Needs root (CI runs as root), like the Slurm
tier; everything is removed again by `stop`.

A host may see the filesystem differently: `start_sshd("B", hide=[path])` mounts an empty directory over each
path in that host's own mount namespace (a node without the shared disk).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HOSTS = {"A": "10.77.0.1", "B": "10.77.0.2"}
BRIDGE, NETNS = "lbr0", "ln"
SSH_CONFIG = Path("/etc/ssh/ssh_config.d/launcher-two-hosts.conf")
ETC_HOSTS_MARK = "# launcher two-hosts test"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)


class TwoHosts:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="launcher-hosts-"))
        self.sshd: dict[str, subprocess.Popen] = {}

    def start(self) -> TwoHosts:
        missing = not Path("/usr/sbin/sshd").exists() or not shutil.which("pdsh")
        if missing and sh("apt-get", "install", "-y", "-q", "openssh-server", "pdsh", check=False).returncode:
            sh("apt-get", "update", "-q")  # a fresh machine's package lists may be empty
            sh("apt-get", "install", "-y", "-q", "openssh-server", "pdsh")
        self.stop_network()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", "10.77.0.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for name, addr in HOSTS.items():
            ns = NETNS + name
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"lv{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"lv{name}", "master", BRIDGE, "up")
            for cmd in (["addr", "add", f"{addr}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                        ["link", "set", "lo", "up"]):
                sh("ip", "netns", "exec", ns, "ip", *cmd)
        for key in ("id", "hostkey"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / key))
        shutil.copy(self.dir / "id.pub", self.dir / "authorized_keys")
        SSH_CONFIG.write_text(f"Host nodeA nodeB\n  IdentityFile {self.dir / 'id'}\n  StrictHostKeyChecking no\n"
                              "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        hosts = Path("/etc/hosts").read_text()
        Path("/etc/hosts").write_text(hosts + "".join(f"{a} node{n} {ETC_HOSTS_MARK}\n" for n, a in HOSTS.items()))
        Path("/run/sshd").mkdir(exist_ok=True)
        for name in HOSTS:
            self.start_sshd(name)
        return self

    def start_sshd(self, name: str, hide: list[Path] = ()) -> None:
        """(Re)start host `name`'s sshd; its sessions see an empty directory at each path in `hide`."""
        if name in self.sshd:
            self.sshd[name].terminate()
            self.sshd[name].wait(10)
        empty = self.dir / f"empty{name}"
        empty.mkdir(exist_ok=True)
        mounts = "".join(f"mount --bind {empty} {p} && " for p in hide)
        sshd = (f"/usr/sbin/sshd -D -e -p 22 -h {self.dir / 'hostkey'} -o StrictModes=no -o UsePAM=no "
                f"-o AuthorizedKeysFile={self.dir / 'authorized_keys'} -o PidFile={self.dir / f'sshd{name}.pid'}")
        self.sshd[name] = subprocess.Popen(
            ["ip", "netns", "exec", NETNS + name, "unshare", "--uts", "--mount", "sh", "-c",
             f"hostname node{name} && {mounts}exec {sshd}"],
            stdout=(self.dir / f"sshd{name}.log").open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while sh("ssh", f"node{name}", "true", check=False).returncode:
            assert self.sshd[name].poll() is None and time.monotonic() < deadline, self.log(name)
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.dir / f"sshd{name}.log").read_text()

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        path.write_text("".join(f"node{name} slots={slots}\n" for name in HOSTS))
        return path

    def stop_network(self) -> None:
        for name in HOSTS:
            sh("ip", "netns", "del", NETNS + name, check=False)  # also removes the veth pairs
        sh("ip", "link", "del", BRIDGE, check=False)

    def stop(self) -> None:
        for proc in self.sshd.values():
            proc.terminate()
            proc.wait(10)
        self.stop_network()
        SSH_CONFIG.unlink(missing_ok=True)
        hosts = Path("/etc/hosts").read_text().splitlines(keepends=True)
        Path("/etc/hosts").write_text("".join(line for line in hosts if ETC_HOSTS_MARK not in line))
        shutil.rmtree(self.dir, ignore_errors=True)
