"""Reading checkpoints: where they come from (sources) and what is in them (reader)."""
