# lessonlib developer commands. Notebooks in nbs/ are the source; see CONTRIBUTING.md.
.PHONY: help docs test export

# The project's environment when there is one (README: python3 -m venv .venv), else what is on the PATH.
BIN := $(if $(wildcard .venv/bin/python),.venv/bin/,)
PY := $(if $(BIN),$(BIN)python,python3)

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

docs:  ## build the static docs site offline into _docs/ (no Quarto needed)
	$(PY) tools/build_docs.py --out _docs

test:  ## run CI locally: fresh venv, sync check, pytest, nbdev_test, docs
	bash .ci/run

export:  ## regenerate lessonlib/*.py from the notebooks and clean the notebooks
	$(BIN)nbdev_clean && $(BIN)nbdev_export && $(BIN)nbdev_clean
