"""halb: a high-availability load-balancer cluster toolkit."""

__version__ = "0.1.0"
