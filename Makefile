# The two commands a new user needs (see README.md):
#   make chat   set everything up, then chat with the default model
#   make test   set everything up, then run the test suite
VENV ?= .venv
ARGS ?=

.PHONY: setup chat test bench clean-venv

setup:
	@VENV=$(VENV) bash scripts/bootstrap.sh

chat: setup
	@$(VENV)/bin/spindle-local chat $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS) tests

clean-venv:
	rm -rf $(VENV)
