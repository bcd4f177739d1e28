"""Shopfloor Gateway: machines on the shop floor to order-status events over MQTT."""

__version__ = "0.1.0"
