"""smtprelay-py: a small, dependable SMTP relay.

The packages follow a message: in through `inbound`, decided in `delivery`,
out through `outbound`, kept by `spool` when it cannot go yet; `config`
reads the settings and `ops` serves metrics. The modules directly in this
folder are the shared values at the bottom (replies, the envelope, the
Failure value, limits, logs, metrics); they import only the standard
library and each other. `cli` and `service` build and connect everything.
"""

__version__ = "0.1.0"
