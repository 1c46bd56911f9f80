"""Fake WebUI `modules` package: just enough of A1111's extension API (names and signatures as in v1.10.1)
for tests/test_scripts.py to import scripts/lycoris_loader.py without a WebUI."""
