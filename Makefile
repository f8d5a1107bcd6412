# `make test` and `make demo` set everything up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
# GPU users: `make TORCH_SPEC=torch test` (or install into .venv yourself first).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: venv test test-fast demo bench proto lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,demo,bench,hf]"
	touch $@

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -ra

# Everything but the slow group: the inner loop while developing.
test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: venv
	$(BIN)/python -m demo $(ARGS)

# Redis is the peer we compare with: installed when we are root on a Debian-like machine,
# otherwise its rows in the results say it was skipped.
bench: venv
	@command -v redis-server >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) || \
		echo "make bench: redis-server not installed; the Redis baseline will be skipped"
	$(BIN)/python -m bench $(ARGS)

# Regenerate the checked-in gRPC code; tests/test_proto.py fails when it is stale.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/memstore/v1/memstore.proto

lint: venv
	$(BIN)/ruff check memstore engram_client tests bench demo examples

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
