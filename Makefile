# kubeos — developer entry points. Works from any directory: make -C <repo> <target> or make -f <repo>/Makefile.
#
#   make demo     the main job: provision a disk image, boot it in QEMU, upgrade, fall back from a broken image
#   make setup    Debian packages + .venv (scripts/setup.sh; cached, ~0.1 s when nothing changed)
#   make lint     ruff check, ruff format --check, mypy
#   make sanity   ansible-test sanity for the kubeos.os collection (scripts/ansible-test-sanity.sh)
#   make test     setup, lint, sanity, the full pytest suite, then molecule (scenario default) if present
#   make bench    run every bench/*.py
#   make clean    remove caches, test output and kept sanity trees (keeps .venv)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
# Sections must run in the order given, even under make -j.
.NOTPARALLEL:
.DEFAULT_GOAL := help

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
BIN := $(VENV)/bin
# Tools started by the recipes (ansible-playbook for molecule, python3.11 for ansible-test) come from .venv.
export PATH := $(BIN):$(PATH)

section = @printf '\n==== %s ====\n' '$(1)'

.PHONY: help demo setup lint sanity pytest molecule test bench clean

help:
	@sed -n 's/^#   make /make /p' '$(ROOT)/Makefile'

demo: setup
	$(call section,demo: provision - boot - upgrade - fall back (scripts/demo.py))
	'$(BIN)/python' '$(ROOT)/scripts/demo.py'

setup:
	$(call section,setup: Debian packages and .venv)
	bash '$(ROOT)/scripts/setup.sh'

lint:
	$(call section,lint: ruff check)
	cd '$(ROOT)' && '$(BIN)/ruff' check .
	$(call section,lint: ruff format --check)
	cd '$(ROOT)' && '$(BIN)/ruff' format --check .
	$(call section,lint: mypy)
	cd '$(ROOT)' && '$(BIN)/mypy'

sanity:
	$(call section,sanity: ansible-test sanity (kubeos.os))
	bash '$(ROOT)/scripts/ansible-test-sanity.sh'

pytest:
	$(call section,pytest: build or find the cached test tools (test OS, node OS, kube-apiserver))
	bash '$(ROOT)/scripts/build-test-os.sh'
	bash '$(ROOT)/scripts/build-node-os.sh'
	bash '$(ROOT)/scripts/build-kube-apiserver.sh'
	$(call section,pytest: full suite)
	cd '$(ROOT)' && KUBEOS_REQUIRE_CLUSTER=1 '$(BIN)/pytest'

molecule:
	@if [[ -f '$(ROOT)/molecule/default/molecule.yml' ]]; then \
		printf '\n==== %s ====\n' 'molecule: test -s default'; \
		cd '$(ROOT)/molecule' && \
		MOLECULE_GLOB='*/molecule.yml' ANSIBLE_COLLECTIONS_PATH="$${ANSIBLE_COLLECTIONS_PATH:-$(ROOT)/collections}" \
			'$(BIN)/molecule' test -s default; \
	else \
		printf '\n==== %s ====\n' 'molecule: skipped (no molecule/default/molecule.yml)'; \
	fi

test: setup lint sanity pytest molecule
	$(call section,test: all passed)

bench:
	$(call section,bench)
	@shopt -s nullglob; cd '$(ROOT)'; files=(bench/*.py); \
	if (( $${#files[@]} == 0 )); then echo 'no bench/*.py'; fi; \
	for f in "$${files[@]}"; do \
		printf '\n---- %s ----\n' "$$f"; \
		'$(BIN)/python' "$$f"; \
	done

clean:
	$(call section,clean)
	cd '$(ROOT)' && rm -rf .mypy_cache .ruff_cache .pytest_cache build \
		collections/ansible_collections/kubeos/os/tests/output
	cd '$(ROOT)' && rm -f kubeos-os-*.tar.gz collections/ansible_collections/kubeos/os/kubeos-os-*.tar.gz
	cd '$(ROOT)' && find . -path ./.venv -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 \
		| xargs -0r rm -rf
	@# Trees kept by failed scripts/ansible-test-sanity.sh runs.
	rm -rf "$${TMPDIR:-/tmp}"/kubeos-sanity.*
