# Two commands on a fresh machine: `make serve` runs the service, `make test` runs the tests.
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

.PHONY: install serve test
install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kgpu serve

test: $(STAMP)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
