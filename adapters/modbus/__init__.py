"""Modbus adapter (TCP, RTU, RTU over TCP): config, planning, decoding, shared lines, shell.

Import the shell from :mod:`adapters.modbus.adapter` (it pulls in pymodbus); the config,
plan and decode modules are pure and cheap to import.
"""
