# The commands people type. Run `make help` for the list; the first target is what a newcomer runs.
SHELL := bash
.SHELLFLAGS := -o errexit -o nounset -o pipefail -c
PY := .venv/bin/python
BOOTSTRAP := deploy/bootstrap.sh

.PHONY: deploy-local stop status logs reload test test-unit test-integration help bootstrap render

deploy-local: bootstrap ## Start the fleet (or apply changed settings), wait for /healthz, print the URLs
	@$(PY) -m deploy.fleet up

stop: bootstrap ## Stop every process of the fleet and free its ports
	@$(PY) -m deploy.fleet stop

status: bootstrap ## supervisor's view plus each instance's health and pool figures
	@$(PY) -m deploy.fleet status

logs: ## Follow every log of the fleet (nginx, supervisord, instances), merged
	@run=$${FLEET_RUN_DIR:-.run}; test -d "$$run/logs" || { echo "no logs in $$run: run make deploy-local"; exit 1; }; \
	exec tail -n 20 -F "$$run"/logs/*.log

reload: bootstrap ## Rolling restart, one instance at a time: new code and settings, no failed requests
	@$(PY) -m deploy.fleet reload

render: bootstrap ## Render nginx.conf, supervisord.conf and settings.json into the run dir, and nginx -t them
	@$(PY) -m deploy.fleet render

test: bootstrap ## Both test tiers (unit, then integration against real nginx + supervisord)
	@$(PY) -m pytest tests/unit tests/integration

test-unit: bootstrap ## In-process tests only (settings, rendering, tasks, pool, handlers)
	@$(PY) -m pytest tests/unit

test-integration: bootstrap ## Tests against private fleets in temp run dirs
	@$(PY) -m pytest tests/integration

bootstrap:
	@$(BOOTSTRAP)

help: ## This list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'
