"""One exception type for every problem a user can fix by changing their input."""


class LmforgeError(Exception):
    """A user-facing error: bad config, bad data, mismatched checkpoint, …

    The message is shown alone (no traceback) by the CLI and the workflow
    scripts, so it must name the file, line or config key at fault.
    """
