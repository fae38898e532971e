"""Reference models shipped inside the package (served offline on a fresh node)."""
