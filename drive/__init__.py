"""The drive: object-store layer, key mapping, listings and uploads for kgpu."""
