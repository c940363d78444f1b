"""KVMemo expiry layer (see ../shared/ARCHITECTURE.md)."""
