# KVMemo development recipes. `just test` is what CI runs.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env_var_or_default("PYTHON", "python")

# Lint, type-check, then run the whole test suite.
test: lint typecheck
    {{python}} -m pytest -q

# ruff over the whole tree.
lint:
    {{python}} -m ruff check .

# mypy --strict over both packages.
typecheck:
    {{python}} -m mypy --strict kvmemo actors

# Run the server with the embedded default configuration.
serve *ARGS:
    {{python}} -m kvmemo serve {{ARGS}}

# Run every benchmark and print its figures (never fails on speed).
bench:
    {{python}} -m benchmarks

# A long chaos run against an embedded store (5 minutes); prints the report.
chaos DURATION="300":
    {{python}} -m kvmemo chaos --duration {{DURATION}}

# Three nodes behind twemproxy (nutcracker, ketama); prints the proxy's redis:// address.
cluster *ARGS:
    {{python}} examples/cluster/run_cluster.py {{ARGS}}
