"""Logs (and later metrics): what admins read about each connection and message."""
