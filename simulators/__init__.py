"""Simulated machines for trying and testing the gateway without hardware."""
