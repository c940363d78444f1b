"""KVMemo engine layer (see docs/design/ARCHITECTURE.md)."""
