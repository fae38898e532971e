"""Signed OCI model images: build, push, sign, pull, verify, cache.

One module per concern: ``mediatypes`` (the names), ``reference``
(``host/repo:tag@digest``), ``manifest`` (the image's manifest, built and
checked), ``layout`` (OCI image layout, a directory or a tar read in place),
``settings`` (the ``[registry]``, ``[trust]`` and ``[cache]`` tables),
``transport`` and ``registry`` (the distribution API client), ``auth``
(challenges and tokens), ``backoff`` (retries with jitter), ``sink``
(streaming a blob to disk while hashing it), ``signing`` and ``trust``
(cosign-compatible signatures and who may sign what), ``verify`` (the checks
before any large blob is fetched), ``pull`` (from a registry, or imported
from a layout) and ``push`` (uploads and signing), ``admit`` (recording the
version), ``cache`` (budget, LRU, gc, verify), ``tags`` (tag→digest records),
``locks`` (between processes), ``progress`` and ``service`` (the daemon's
hooks ``agent.puller`` and ``agent.cache``). The format is documented in
docs/IMAGE_FORMAT.md.
"""
