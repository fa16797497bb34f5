"""Schema tags of the file contracts: ``"<name>/<major>"`` in every record.

A reader accepts its own name and major version only; the typed records in
:mod:`triplets.records` validate the fields.
"""

FACES_SCHEMA = "reliableswap.faces/1"
FLAME_SCHEMA = "reliableswap.flame/1"
PAIRS_SCHEMA = "reliableswap.pairs/1"
MANIFEST_SCHEMA = "reliableswap.manifest/1"
FLOWS_SCHEMA = "reliableswap.flows/1"
REJECTS_SCHEMA = "reliableswap.rejects/1"
SUMMARY_SCHEMA = "reliableswap.summary/2"
EMBEDDINGS_SCHEMA = "reliableswap.embeddings/1"
