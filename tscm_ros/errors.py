"""Errors the package raises on bad input. Each message names the file and the problem."""


class TscmError(Exception):
    """Base class: a user-facing error whose message is printed as-is by the command-line tools."""


class ConfigError(TscmError):
    """A configuration file, parameter or command-line value is invalid."""


class BagError(TscmError):
    """A bag is missing, corrupt, or lacks the topics a tool needs."""


class CheckpointError(TscmError):
    """A checkpoint is corrupt, from another version, or does not match the requested model."""


class MapError(TscmError):
    """A keyframe map is missing, corrupt, from a newer version, or built with another model."""


class DatasetError(TscmError):
    """A dataset directory is missing, empty or inconsistent."""
