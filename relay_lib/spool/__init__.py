"""Spool: store and forward (SPEC 9).

Owns everything under spool_dir: queue files and their durability, loading
the queue at start-up, the retry scheduler, bounces (RFC 3464 DSNs) and the
-queue, -flush and -delete commands. Wraps delivery: it runs delivery's
steps and keeps what they could not finish; delivery never knows it exists.
May import: the bottom modules, config, delivery.
"""
