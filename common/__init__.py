"""Ferry's shared layer: backbones, heads, data, privacy accounting, serialization."""
