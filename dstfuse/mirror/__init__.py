"""The mirror algorithm (DST's mirror): every leg holds the whole storage.

`algorithm.Mirror` is registered as "mirror" in `dstfuse.algorithms`; the
other modules are its parts (docs/mirror-metadata.md describes them and the
on-disk format). Nothing is imported here, so a mount without mirrors never
loads them.
"""
