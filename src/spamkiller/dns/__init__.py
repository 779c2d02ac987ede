"""DNS for the checks: one narrow resolver protocol, one real implementation, one for tests.

- ``resolver``: the ``Resolver`` protocol, the ``Tlsa`` value, the ``DnsError`` tree and the
  name helpers. Standard library only; this is the one module checks may import.
- ``dnspython``: ``DnspythonResolver``, the production implementation on ``dns.asyncresolver``
  with its cache. The only module of the project that imports dnspython; the composition root
  (``server/app.py``) builds one per process and hands it to the checks.
- ``memory``: ``MemoryResolver``, a dict-backed implementation for unit tests of checks.

This package file imports nothing, so importing ``spamkiller.dns.resolver`` never loads
dnspython. See ``docs/dns.md`` for the semantics every implementation keeps.
"""
