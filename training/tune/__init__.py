"""`cnnloop tune`: the search space, the objective, the shared study and its outputs."""
