"""KVMemo engine layer (see ../shared/ARCHITECTURE.md)."""
