"""The fleet's Tornado instances: what runs behind nginx and serves requests.

    python -m services.fast --settings .run/settings.json --instance 1    # supervisord runs these
    python -m services.slow --settings .run/settings.json --instance 1

Packages, dependencies one way (fast and slow import common, never each other):
    common/  what both kinds of instance share: settings, the server's life, handlers' base, logs,
             metrics, the event-loop watchdog, the inventory of hosts
    fast/    the fast routes (/fast, /echo)
    slow/    the heavy routes: admission, the slow path's contract, the two pool backends, tasks
"""
