"""The upstream service: the stand-in backends that the fan-out routes call (app.py).

SERVICES and KEY are here, apart from the app, so that a fast instance can use them without loading it.
"""

import re

SERVICES = ("users", "friends", "posts", "recs", "search", "items")  # fixed: each is a metrics label
KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # a key the services take: the lookup route checks it before calling
