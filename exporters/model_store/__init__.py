"""The model store: the bundle format (the files one version holds) and the registry of versions and aliases. torch-free."""
