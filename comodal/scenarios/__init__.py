"""Tasks, scenarios, datasets and the embedded corpora."""
