"""KVMemo benchmarks: ``just bench`` runs them all (``python -m benchmarks``)."""
