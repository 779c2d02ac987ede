"""Judging connections and messages: checks report findings, policy decides."""
