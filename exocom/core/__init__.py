"""The sans-I/O core: plain synchronous Python, events in, actions out.

It knows nothing of sockets, trio or files. `broker.Broker` takes the events
(a connection opened, a frame arrived, a connection closed, the clock ticked,
a ledger record was written) and returns actions (`actions`); the modules
beside it each hold one concept it uses.
"""
