"""The backbone registry (one record per name) and the classifier that is trained and exported."""
