"""Console scripts: one thin module per command; each ``main`` parses, then makes one library call."""
