"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class OpdError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class ConfigError(OpdError):
    pass


class DataError(OpdError):
    pass


class ModelError(OpdError):
    pass


class TrainingDiverged(OpdError):
    pass


class StudentCollapsed(TrainingDiverged):
    """The collapse guard fired with run.collapse_guard: stop."""
