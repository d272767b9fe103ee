"""The one error type for a configuration mistake, shared by every part:
each daemon and tool turns it into one line on stderr and its exit code."""


class ConfigError(ValueError):
    """A setting, flag or configuration file is wrong; the text says which
    and why."""
