"""The plain client lives in the service package (`memstore.client`); this name stays for the
code that imports it from here."""
from memstore.client import Job, MemStoreClient, StepOrder, TableInfo, TlsConfig

__all__ = ["Job", "MemStoreClient", "StepOrder", "TableInfo", "TlsConfig"]
