"""os-ken applications."""
