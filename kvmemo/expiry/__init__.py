"""KVMemo expiry layer (see docs/design/ARCHITECTURE.md)."""
