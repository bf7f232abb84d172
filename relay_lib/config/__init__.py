"""Configuration: from the ini file, `.env`, SMTPRELAY_* variables and flags
to one frozen `Settings` (SPEC 2), and the remote URL grammar (SPEC 5.1).

Owns the option table, the Go ini and `.env` formats, the precedence of the
sources, RE2 translation and splitting the `command` option. Parsers raise
`ConfigError`; nothing here logs or exits. May import: the bottom modules.
"""
