"""Lab and test infrastructure: network namespaces, private OVS instances, packet helpers."""
