"""The upstream service: the stand-in backends that the fan-out routes call (app.py).

SERVICES is here, apart from the app, so that a fast instance can name them without loading the app.
"""

SERVICES = ("users", "friends", "posts", "recs", "search", "items")  # fixed: each is a metrics label
