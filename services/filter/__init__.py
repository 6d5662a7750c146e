"""Filter service: drops workers that cannot host a model for non-resource reasons."""
