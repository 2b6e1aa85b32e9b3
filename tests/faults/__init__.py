"""Fault injection for the tests: our own server instances, a TCP proxy, a moved clock."""
