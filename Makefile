# The commands people type. Run `make help` for the list; the first target is what a newcomer runs.
SHELL := bash
.SHELLFLAGS := -o errexit -o nounset -o pipefail -c
PY := .venv/bin/python
BOOTSTRAP := deploy/bootstrap.sh
LOCUST := .venv/bin/locust
# The fleet's fast routes for the isolation check (locustfile.py alone defaults to GET /fast only),
# a fan-out route among them (GET /profile/42 calls the upstream service five times);
# LOAD_OPTS passes more Locust options, e.g. make load-check LOAD_OPTS="--mixed-seconds 60".
# LOCUST_WORKERS=N (N >= 0) runs Locust as a master with N worker processes (--processes N) for
# load beyond one core; 0 or unset is one process. Workers on other hosts: README.md, "Prove it".
FAST_ROUTES := GET /fast, POST /echo, GET /profile/42
# Each fast user sends every route FAST_RATE times a second: 10 users x 3 routes x 3 = 90 requests
# a second, under the edge's 100 a second per client (the fast users share one address).
FAST_RATE := 3
# The heavy flood against the fleet: distinct work in every request ({random}), which the fleet's
# compute-once cannot merge (a flood of identical /slow/fib/30 would be a few shared jobs).
HEAVY_MIX := /slow/digest/300000?data={random}:3,/slow/digest/1000000?data={random}:1,/slow/fib/25:1
# Long jobs beside the flood (issue 26): a client of long jobs (/slow/report, Prefer: respond-async;
# it follows each job's event stream, cancels some) and 300 event streams held open on its jobs.
# make load-check LONG_JOBS= runs the check without them.
LONG_JOBS := --long-job-users 1 --long-job-streams 300
LOAD_OPTS ?=
SOAK_MINUTES ?= 10
# The integration tier in two sessions: the tests that only check behaviour two at a time, each
# worker a file at a time (--dist loadfile: a module's fleet serves its tests on one worker); then
# those marked alone (latency verdicts, faults under load: pytest.ini), with the machine to themselves.
INTEGRATION_TESTS := $(PY) -m pytest -n 2 --dist loadfile -m "not alone" tests/integration && \
	$(PY) -m pytest -m alone tests/integration
SOAK_OPTS ?=
LOCUST_WORKERS ?= 0
# The port a Locust master listens on for its workers (Locust's own default); a second run with
# workers on this host at the same time needs another one.
LOCUST_MASTER_PORT ?= 5557
# --processes N when LOCUST_WORKERS > 0, after the shell checked that it is a whole number
LOCUST_PROCESSES = $(if $(filter-out 0,$(LOCUST_WORKERS)),--processes $(LOCUST_WORKERS) \
	--master-bind-port $(LOCUST_MASTER_PORT) --master-port $(LOCUST_MASTER_PORT))
CHECK_LOCUST_WORKERS := case '$(LOCUST_WORKERS)' in ''|*[!0-9]*) \
	echo "error: LOCUST_WORKERS must be a whole number >= 0 (0: one Locust process), got '$(LOCUST_WORKERS)'" >&2; exit 2;; esac
# With workers, the master's port must be free before Locust starts: a master that cannot bind it
# dies, and its forked workers retry connecting for 5 minutes before they give up (Locust 2.47).
CHECK_LOCUST_MASTER_PORT = $(if $(filter-out 0,$(LOCUST_WORKERS)),$(PY) -c 'import sys; from deploy.control import port_taken; \
	sys.exit(port_taken("", int(sys.argv[1]), "the Locust master port", "LOCUST_MASTER_PORT"))' '$(LOCUST_MASTER_PORT)',true)
EDGE_URL := $(PY) -c 'from deploy.fleet import edge_url; from services.common.settings import load; print(edge_url(load()))'
FLEET_UP_IF_DOWN := $(PY) -c 'import sys; from deploy.fleet import supervisord_pid; from services.common.settings import load; \
	sys.exit(0 if supervisord_pid(load()) else 1)' || $(PY) -m deploy.fleet up

.PHONY: deploy-local stop status logs profile reload chaos certs test test-unit test-integration fuzz soak help install bootstrap bootstrap-tests render load load-check observe bench

deploy-local: bootstrap ## Start the fleet (or apply changed settings), wait for /healthz, print the URLs
	@$(PY) -m deploy.fleet up

# The bootstrap alone, for a machine whose fleet is started by systemd (deploy/fleet.service), which
# never installs: run it after each update of the code.
install: ## Install what the fleet runs on, nothing else: nginx when missing (as root), the .venv from requirements.txt
	@$(BOOTSTRAP)

stop: bootstrap ## Stop every process of the fleet and free its ports
	@$(PY) -m deploy.fleet stop

status: bootstrap ## supervisor's states plus each instance's in-flight, busy workers, queue and loop lag
	@$(PY) -m deploy.fleet status

logs: bootstrap ## Follow every log of the fleet (nginx access, refusals and errors, supervisord, instances), merged
	@$(PY) -m deploy.logs

profile: bootstrap ## Flame graph of an instance and its workers: make profile TARGET=slow-01 SECONDS=10
	@$(PY) -m deploy.profile $(or $(TARGET),slow-01) $(or $(SECONDS),10)

reload: bootstrap ## Rolling restart, one instance at a time: new code and settings, no failed requests
	@$(PY) -m deploy.fleet reload

chaos: bootstrap ## Break the running fleet (kill -9 instances, workers, nginx; drain; reload; long jobs' kill and cancels) under load; print the table
	@$(PY) -m drills.chaos

render: bootstrap ## Render nginx.conf, supervisord.conf and settings.json into the run dir, and nginx -t them
	@$(PY) -m deploy.fleet render

certs: bootstrap ## The fleet's CA and a certificate per host, for Dask TLS across hosts (into dask.certs_dir, .certs/)
	@$(PY) -m deploy.certs

test: bootstrap-tests ## Both test tiers (unit on both cores, then integration against real nginx + supervisord)
	@$(PY) -m pytest -n 2 tests/unit
	@$(INTEGRATION_TESTS)

test-unit: bootstrap-tests ## In-process tests only (settings, rendering, tasks, pool, handlers), two at a time
	@$(PY) -m pytest -n 2 tests/unit

test-integration: bootstrap-tests ## Tests against private fleets in temp run dirs (two at a time, then those marked alone)
	@$(INTEGRATION_TESTS)

fuzz: bootstrap-tests ## Generated hostile input by the thousand (Hypothesis): 2,000 per task parser, 5,000 raw requests through a private fleet's edge (about 6 min)
	@HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/unit/test_task_parsers_fuzz.py tests/integration/test_fuzz_edge.py

soak: bootstrap ## Load and long jobs for SOAK_MINUTES (10) while faults recur (kills, overruns, bursts, reloads, job processes, the runner): fails on any failed request, growth or leftover; SOAK_OPTS="--out bench/results"
	@$(PY) -m drills.soak --deploy --minutes $(SOAK_MINUTES) $(SOAK_OPTS)

load: bootstrap ## Locust's web UI on http://127.0.0.1:8089 (host preset to the edge; deploys the fleet if it is down); LOCUST_WORKERS=N
	@$(CHECK_LOCUST_WORKERS)
	@$(CHECK_LOCUST_MASTER_PORT)
	@$(FLEET_UP_IF_DOWN)
	@edge=$$($(EDGE_URL)); echo "Locust web UI: http://127.0.0.1:8089  (host $$edge; start the shaped run, then open the Isolation tab)"; \
	exec $(LOCUST) -f locustfile.py $(LOCUST_PROCESSES) --web-host 127.0.0.1 --web-port 8089 --host "$$edge" \
	    --fast-routes "$(FAST_ROUTES)" --fast-rate $(FAST_RATE) --heavy-mix "$(HEAVY_MIX)" $(LONG_JOBS) $(LOAD_OPTS)

load-check: bootstrap ## Headless isolation proof against the fleet: per-phase table, report in the run dir, exit code = verdict; LOCUST_WORKERS=N
	@$(CHECK_LOCUST_WORKERS)
	@$(CHECK_LOCUST_MASTER_PORT)
	@$(FLEET_UP_IF_DOWN)
	@run=$${FLEET_RUN_DIR:-.run}; edge=$$($(EDGE_URL)); mkdir -p "$$run"; \
	echo "isolation check against $$edge$(if $(LOCUST_PROCESSES), with $(LOCUST_WORKERS) Locust worker processes) (about 80 s; report: $$run/load-check.html, CSVs: $$run/load-check_*.csv)"; \
	$(LOCUST) -f locustfile.py $(LOCUST_PROCESSES) --headless --only-summary --host "$$edge" --fast-routes "$(FAST_ROUTES)" --fast-rate $(FAST_RATE) --heavy-mix "$(HEAVY_MIX)" $(LONG_JOBS) \
	    --html "$$run/load-check.html" --csv "$$run/load-check" $(LOAD_OPTS)

observe: bootstrap ## The fleet's own Prometheus with its alert rules on http://127.0.0.1:9090 (deploys the fleet if it is down; Ctrl-C stops it)
	@$(BOOTSTRAP) --observe
	@$(FLEET_UP_IF_DOWN)
	@exec $(PY) -m deploy.observe

bootstrap:
	@$(BOOTSTRAP)

# What the tests need besides: redis-server, for the store tests (tests/support/redis_server.py);
# prometheus, for the rules' tests (promtool) and make observe's.
bootstrap-tests:
	@$(BOOTSTRAP) --tests

bench: bootstrap ## Benchmark the fleet against naive, pool, the peers (FastAPI, gunicorn, Tornado+Dask; direct and behind nginx) and the machine's floor; CPU per fast request; results in bench/results/
	@bench/bootstrap.sh
	@$(PY) -m bench $(BENCH_ARGS)
	@# The hot-key scenario (compute once on and off, and the edge cache), bench/hotkey.py.
	@$(PY) -m bench.hotkey $(if $(findstring --quick,$(BENCH_ARGS)),--rounds 1 --waves 3 --out bench/results-quick/hotkey.md,--out bench/results/hotkey.md)
	@# Fast latency across load levels, idle and under the flood (bench/levels.py).
	@$(PY) -m bench.levels $(if $(findstring --quick,$(BENCH_ARGS)),--quick --out bench/results-quick,--out bench/results)
	@# Where a fast request's CPU goes: nginx and a fast instance beside a bare Tornado Hello, and
	@# py-spy's profile of what the fleet's instance adds (bench/request_cost.py).
	@$(PY) -m bench.request_cost $(if $(findstring --quick,$(BENCH_ARGS)),--quick --out bench/results-quick,--out bench/results)
	@# Source document 000's two experiments (bench/doc000.py).
	@$(PY) -m bench.doc000 $(if $(findstring --quick,$(BENCH_ARGS)),--repeat 1 --out bench/results-quick/doc000.md,--out bench/results/doc000.md)
	@# The fan-out routes at fixed rates, hedging on and off (bench/fanout.py; about 40 min).
	@$(PY) -m bench.fanout $(if $(findstring --quick,$(BENCH_ARGS)),--quick --out bench/results-quick,--out bench/results)

help: ## This list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'
	@echo
	@echo "  Settings: deploy/fleet.toml (override with FLEET_<SECTION>_<KEY>=...). Code: deploy/ (run the"
	@echo "  fleet), nginx/ (the edge), services/ (fast and slow apps, worker pools, the long jobs' runner), drills/ (chaos, soak),"
	@echo "  locustfile.py (the isolation proof), tests/, bench/."
	@echo "  Runtime files, logs and sockets: .run/ (or \$$FLEET_RUN_DIR). More in README.md."
	@echo "  make load / load-check: LOAD_OPTS=\"...\" adds Locust options; LOCUST_WORKERS=N runs a Locust master"
	@echo "  with N worker processes (0 or unset: one process; workers on other hosts: README.md, \"Prove it\")."
