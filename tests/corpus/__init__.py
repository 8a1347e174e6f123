"""Real-world recall corpus (issue #12): public dtype bug reports reproduced on CPU, each with the finding
dtypelint must produce, and the fixed versions as clean controls. ``python -m tests.corpus`` prints the table."""
