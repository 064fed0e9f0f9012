"""The retention period's bounds, shared by the settings, the command and the services: a module of
its own, which settings.py imports before Django has loaded any model."""

# A century, far more than any retention rule asks: beyond about 2,025 years (the days since year 1,
# in 2026) the cutoff falls before year 1 and the date arithmetic overflows.
MAX_RETENTION_DAYS = 36500
