"""Kernel NAT mode."""
