"""The errors a user can fix: the command line reports them as one line (exit status 2).

Anything else is a defect and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user asked for or gave: a config value, data, a path, a checkpoint."""


class ConfigError(UserError, ValueError):
    """A configuration problem, reported with the offending key's dotted name."""


class DataError(UserError, ValueError):
    """Shards, manifests or evaluation sets that cannot be read as asked."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or resumed; the previous one is untouched and still the latest."""


class TrainingHalted(UserError, RuntimeError):
    """The run cannot go on usefully (too much bad data, or no finite gradients); the last periodic
    checkpoint stays the latest."""
