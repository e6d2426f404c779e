"""Errors of the data layer: messages are for people (name the thing, say what to do)."""


class DataError(ValueError):
    """Bad input or a bad data directory that a person has to fix."""


class CorruptShardError(DataError):
    """A shard file that is missing, truncated or does not match its manifest entry."""
