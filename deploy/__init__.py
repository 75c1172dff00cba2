"""The deployer: runs this host's part of the fleet from deploy/fleet.toml (`make deploy-local`,
`make stop`, `make status`, `make reload`, `make render`, `make certs`). The drills (drills/) and the
benchmark (bench/) use it; it imports neither.

    .venv/bin/python -m deploy.fleet up        # render, start or apply changes, wait for /healthz

Modules, one role each:
    fleet         the commands: up, stop, status, reload, render
    apply         changes to a running fleet, one step at a time, recorded in the run dir (applied.json)
    programs      what runs on this host: its instances and spares, its Dask processes
    render        settings -> nginx.conf, supervisord.conf (the .j2 templates), settings.json, targets
    rundir        how root makes, hands over and removes files in the run dir, never through a link
    private       the run dir's private files: TLS certificates and the edge's secret
    privilege     which user the fleet's processes run as (process.user), and what it is handed
    certs         `make certs`: the fleet's CA and a certificate per host
    control       talking to supervisord and the instances: health, ports, nginx -t
    nginx_launch  nginx's parent under supervisord: keeps the edge socket, retires orphaned workers
    log_rotation  nginx's logs rotated by size
    procs         finding a fleet's processes by the marker they inherit
    logs          `make logs`: every log, merged and readable
    profile       `make profile`: a flame graph of an instance and its workers
    bootstrap.sh  nginx and the .venv (`make install`); fleet.service: a systemd unit
"""
