"""The built-in prompt suite of `nanoseek audit` (one JSONL file per category; schema in docs/audit.md) and the
classifier's hand-labelled test set (labelled.jsonl). Loaded with importlib.resources by nanoseek.audit."""
