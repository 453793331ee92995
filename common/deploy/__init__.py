"""Deployment plumbing both launchers share: ``ferry server`` (:mod:`server.superlink`,
:mod:`server.proxy`) and ``ferry client`` (:mod:`client.supernode`, :mod:`client.task_launcher`).

Kept in its own room, apart from common's model, data and privacy layer, because only the
launchers of real processes use it (a simulation never does): TLS and key checks made before
any Flower process starts (:mod:`.tls`), child processes stopped completely
(:mod:`.child_processes`), and the certificate file names and institution names both sides
agree on (:mod:`.names`). Issuing certificates (``ferry certs``) is the operator's:
:mod:`server.certs`.
"""
