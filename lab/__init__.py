"""The network-namespace lab, the failover demo and the chaos suite (see lab/README.md)."""
