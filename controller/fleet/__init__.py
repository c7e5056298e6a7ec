"""The fleet database: a clustered OVSDB (Raft) shared by every socknet host.

Schema, RBAC rules and first rows (``schema``), the members' command lines and
processes (``cluster``), the fleet CA (``pki``), a host's client (``client``),
administrative access (``admin``), commands (``cli``) and metrics
(``metrics``). The decisions on the records are pure, in ``topology.fleet``.
See docs/fleet.md.
"""
