"""dstfuse: distributed network block storage presented as files through FUSE."""

__version__ = "0.1.0"
