"""Test helpers that ship with the package (real tokenizers built offline, small fixtures)."""
