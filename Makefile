# lessonlib developer commands. Notebooks in nbs/ are the source; see CONTRIBUTING.md.
.PHONY: help docs docsquick test export

# The project's environment when there is one (README: python3 -m venv .venv), else what is on the PATH.
BIN := $(if $(wildcard .venv/bin/python),.venv/bin/,)
PY := $(if $(BIN),$(BIN)python,python3)

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

docs:  ## run every notebook and build the static docs site, outputs and math included, into _docs/ (no Quarto)
	$(PY) tools/build_docs.py --out _docs

docsquick:  ## the same site without running the notebooks (only the outputs stored in them: incomplete)
	$(PY) tools/build_docs.py --out _docs --no-exec

test:  ## run CI locally: venv, sync check, docs build (runs every notebook), pytest
	bash .ci/run

export:  ## regenerate lessonlib/*.py from the notebooks and clean the notebooks
	$(BIN)nbdev_clean && $(BIN)nbdev_export && $(BIN)nbdev_clean
