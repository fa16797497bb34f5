"""The official ReliableSwap triplet layout and type codes.

A triplet folder holds four images of one pair (s = source/identity donor, t = target/attribute
donor): ``source.jpg``, ``target.jpg``, ``output_st.jpg`` (s's identity on t's attributes) and
``output_ts.jpg``. The official loader (modules/dataset/dataloader.py) builds training samples
``(source, target | reference)`` with these type codes:

== ============ ==========
0  s_v, t_v     no reference (vanilla pair)
1  t,   t       t (same identity: reconstruction)
2  s,   t       st
3  t,   s       ts
4  st,  ts      s  (cycle: the real face comes back)
5  ts,  st      t
== ============ ==========
"""

from __future__ import annotations

FILES = {"source": "source.jpg", "target": "target.jpg", "output_st": "output_st.jpg", "output_ts": "output_ts.jpg"}

#: type code → (source key, target key, reference key or None) over a folder's four images.
TYPE_TABLE: dict[int, tuple[str, str, str | None]] = {
    2: ("source", "target", "output_st"),
    3: ("target", "source", "output_ts"),
    4: ("output_st", "output_ts", "source"),
    5: ("output_ts", "output_st", "target"),
}
VANILLA, SAME = 0, 1
ALL_CODES = (0, 1, 2, 3, 4, 5)
#: Codes the official code supervises with a pixel reference by default (cycle types + same).
DEFAULT_REC_CODE = (1, 2, 3, 4, 5)
