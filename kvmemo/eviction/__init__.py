"""KVMemo eviction layer (see docs/design/ARCHITECTURE.md)."""
