"""smtprelay-py: a small, dependable SMTP relay."""

__version__ = "0.1.0"
