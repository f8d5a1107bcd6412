"""memstore: a gRPC daemon serving n-gram embedding tables with server-side sparse optimizers."""
__version__ = "0.1.0"
