"""OPC UA adapter: config models, pure addressing and value mapping, security, the client shell.

Import the shell from :mod:`adapters.opcua.adapter` (it pulls in asyncua, which takes about
half a second to import); :mod:`~adapters.opcua.config`, :mod:`~adapters.opcua.nodes` and
:mod:`~adapters.opcua.values` are pure and cheap to import.
"""
