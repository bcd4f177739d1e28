"""Modbus TCP adapter: config models, pure read planning and decoding, the polling shell.

Import the shell from :mod:`adapters.modbus.adapter` (it pulls in pymodbus); the config,
plan and decode modules are pure and cheap to import.
"""
