"""KVMemo commands layer (see docs/design/ARCHITECTURE.md)."""
