"""engram_client: the model side of Engram (hashing, token compression, EngramBlock, table sources)."""

from engram_client.block import EngramBlock, EngramState, ShortConv
from engram_client.compression import CompressedTokenizer, build_token_map, tokenizer_fingerprint
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher
from engram_client.optim import RowwiseAdam
from engram_client.tables import LocalTables, TableSource

# ---- remote table sources ----------------------------------------------------------------------
# Reserved for the lead: MemStoreClient / ShardedClient (and remote TableSources) are exported here.

__all__ = [
    "CompressedTokenizer",
    "EngramBlock",
    "EngramConfig",
    "EngramState",
    "LocalTables",
    "NgramHasher",
    "RowwiseAdam",
    "ShortConv",
    "TableSource",
    "build_token_map",
    "tokenizer_fingerprint",
]
