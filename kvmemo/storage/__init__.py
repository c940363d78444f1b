"""KVMemo storage layer (see docs/design/ARCHITECTURE.md)."""
