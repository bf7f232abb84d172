"""Operations: what an operator asks of a running relay (SPEC 6, 12).

Owns the /metrics and /healthz endpoint and the build information of
-version. Reads the metrics registry; counts nothing itself.
May import: the bottom modules, config.
"""
