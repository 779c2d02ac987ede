"""Test harnesses: real servers on 127.0.0.1 (the MX in a thread, upstreams, certificates)."""
