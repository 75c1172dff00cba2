"""The benchmark's peers: what a user would run instead of the fleet (issue 12).

Each serves GET /fast -> "Hello!", GET /slow/fib/<n> -> the fleet's JSON (n <= 35), GET /healthz,
with the fleet's own fib (services.slow.tasks, standard library only). They run from
bench/peers/.venv, built by bench/bootstrap.sh from bench/peers/requirements.txt, never from
the product's environment.

    common       fib, its JSON answer, the fib route's bounds: what every peer shares
    asgi_pool    FastAPI under gunicorn's uvicorn workers, fib in a ProcessPoolExecutor
    wsgi_app     one WSGI app for gunicorn: fib in the request (sync workers) or in a dirty
                 arbiter's worker (gthread + dirty arbiters), and the dirty app itself
    dirty_nice   gunicorn settings for the niced dirty arbiter variant (dirty_post_fork hook)
    tornado_dask source document 000's Tornado + Dask (Client(asynchronous=True), a local cluster)
"""
