"""Test scaffolding shared by tests/ and bench/ (never imported by production code)."""
