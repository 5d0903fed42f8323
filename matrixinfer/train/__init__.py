"""Training the bundled demo model (DeepSeek-V3 architecture, CPython stdlib corpus)."""
