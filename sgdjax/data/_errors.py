"""The one error type of the data layer."""


class DataError(ValueError):
    """Missing, empty or malformed data; the message names the path and how to get the data."""
