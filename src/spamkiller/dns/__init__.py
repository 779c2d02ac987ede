"""DNS for the checks: one narrow resolver protocol, two real implementations, one for tests.

- ``resolver``: the ``Resolver`` protocol, the ``Tlsa`` value, the ``DnsError`` tree and the
  name helpers. Standard library only; this is the one module checks may import.
- ``cache``: ``CachingResolver``, what both real implementations share (settings, the TTL
  cache, single flight). Standard library only.
- ``cares``: ``CaresResolver``, the default (``dns.backend: cares``), on c-ares; the only
  module that imports pycares. Its ``tlsa`` goes to a ``DnspythonResolver`` (the AD bit).
- ``dnspython``: ``DnspythonResolver`` on ``dns.asyncresolver`` (``dns.backend: dnspython``);
  the only module of the project that imports dnspython.
- ``memory``: ``MemoryResolver``, a dict-backed implementation for unit tests of checks.

The composition root (``server/app.py``, ``build_resolver``) builds one per process and hands
it to the checks. This package file imports nothing, so importing ``spamkiller.dns.resolver``
never loads a DNS library. See ``docs/dns.md`` for the semantics every implementation keeps.
"""
