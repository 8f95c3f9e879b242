"""User-facing errors: anything raised as a `UserError` ends the run with one line and exit code 2."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreachable server)."""

    exit_code = 2


class ConfigError(UserError):
    """A config value has the wrong type, is unknown, or is out of range."""


class DataError(UserError):
    """Dataset files are missing or unreadable."""


class TrackingError(UserError):
    """The tracking backend cannot be reached or used."""


class CapacityError(UserError):
    """A method ran out of free capacity mid-run (results so far are kept)."""


class TrainingError(UserError):
    """A run failed after it started (e.g. its loss became NaN): the finished tasks are kept, exit code 1."""

    exit_code = 1
