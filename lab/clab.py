"""The files behind ``lab/halb.clab.yml``: the containerlab topology's node configs and PKI.

    python -m lab configs        # rewrites lab/configs/clab/{lb1,lb2}.toml and pki/

The containerlab topology mirrors the default netns lab (``lab.topology.DEFAULT``): the same
addresses, VIP, ports and timers; only the data interface is ``eth1`` (containerlab gives
every container its management interface as ``eth0``) and the paths are the image's
(``Containerfile``): state in /run/halb, control socket /run/halb/halb.sock (what the image's
HEALTHCHECK asks), certificates in /etc/halb/pki.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .topology import DEFAULT, Topology

HERE = Path(__file__).resolve().parent
CLAB_DIR = HERE / "configs" / "clab"
STATE_DIR = "/run/halb"
PKI_DIR = "/etc/halb/pki"
CONTROL_SOCKET = "/run/halb/halb.sock"

TOPOLOGY: Topology = replace(DEFAULT, interface="eth1")


def config_text(lb_name: str) -> str:
    return TOPOLOGY.node_config(lb_name, state_dir=STATE_DIR, pki_dir=PKI_DIR,
                                control_socket=CONTROL_SOCKET)


def write(out_dir: Path = CLAB_DIR, *, pki: bool = True) -> list[Path]:
    """Writes the LB configs (and, with ``pki``, a fresh lab CA and node certificates)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for h in TOPOLOGY.lb_hosts:
        p = out_dir / f"{h.name}.toml"
        p.write_text(config_text(h.name))
        written.append(p)
    if pki:
        from halb import pki as hpki
        d = out_dir / "pki"
        d.mkdir(exist_ok=True)
        hpki.generate(d, [h.name for h in TOPOLOGY.lb_hosts],
                      ips={h.name: [str(h.address.ip)] for h in TOPOLOGY.lb_hosts})
        (d / "ca.key").unlink()  # the nodes need only the CA certificate
        for f in d.glob("*.key"):  # bound read-only into containers whose halbd is not root
            f.chmod(0o644)
        written.extend(sorted(d.iterdir()))
    return written
