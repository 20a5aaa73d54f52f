"""tlt.proto and the Python modules generated from it (committed; see the .proto for how to regenerate)."""
