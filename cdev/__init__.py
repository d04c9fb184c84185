"""Generic trio-native userspace character devices over libfuse3 (FUSE or CUSE)."""
