"""KVMemo server layer (see docs/design/ARCHITECTURE.md)."""
