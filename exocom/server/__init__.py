"""The trio shell around the core: it moves bytes, owns tasks, timers and
bounded outboxes, writes the ledger, and carries out the core's actions.
"""
