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


class ClusterError(UserError):
    """A sweep's cluster cannot be reached or refused its jobs (launcher=ray|slurm); the sweep's parent run is
    closed as `status`."""

    status = "FAILED"


class ClusterJobError(ClusterError):
    """A job did not finish on the cluster (killed, lost, failed); the finished jobs are kept, exit code 1."""

    exit_code = 1

    def __init__(self, message: str, status: str = "FAILED"):
        super().__init__(message)
        self.status = status
