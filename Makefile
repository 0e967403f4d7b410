# Two commands on a fresh machine: `make serve` runs the service, `make test` runs the tests.
# The Python environment comes from requirements.lock alone (docs/development.md): every package
# pinned and hash-checked, the project itself installed without resolving anything.
VENV ?= .venv
LOCK := requirements.lock
PROJECTS := pyproject.toml client/pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) $(PROJECTS) | sha1sum | cut -c1-12)

# A changed lock rebuilds the environment from nothing, so no package the lock dropped lingers.
# Two projects: the client (kgpu-client, client/pyproject.toml: the `kgpu` command) and the server.
$(STAMP): $(LOCK) $(PROJECTS)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e ./client -e .
	$(VENV)/bin/pip check
	touch $@

.PHONY: install serve test lock
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kgpu serve

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Refresh requirements.lock from pyproject.toml's ranges (then run the suite before committing it).
lock:
	bash .ci/lock
