"""The job runner program: one per host of the slow role, under supervisor (app.py)."""
