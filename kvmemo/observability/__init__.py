"""KVMemo observability layer (see docs/design/ARCHITECTURE.md)."""
