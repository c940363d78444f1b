"""KVMemo eviction layer (see ../shared/ARCHITECTURE.md)."""
