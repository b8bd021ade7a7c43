"""Runtime: the Device protocol, its backends (golden model first) and the host driver."""
