"""A client for the OCI distribution API of one registry: manifests and blobs, in and out.

Blobs stream straight into the content-addressed store while their sha256 is
computed; nothing is visible under a digest before its bytes hashed to it.
An interrupted blob leaves a partial file named after its digest, and the
next attempt (in this process or after a restart) asks only for the rest
with an HTTP ``Range`` request.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol
from urllib.parse import urlencode, urljoin

from agent.cas import BlobStore, sha256_digest
from agent.errors import CorruptBlob
from agent.images import mediatypes as mt
from agent.images.errors import ImageError, ImageRefused, RegistryError
from agent.images.manifest import Descriptor
from agent.images.settings import RegistrySettings
from agent.images.sink import BlobSink
from agent.images.transport import Response, Transport

READ_BLOCK = 1 << 20


class ProgressSink(Protocol):
    """What a blob download reports to: bytes as they arrive (see agent.images.progress).

    A Protocol, not a base class: any ``agent.images.progress.Progress`` is one,
    without inheriting from it.
    """

    def advance(self, n: int) -> None: ...


@dataclass
class BlobFetch:
    digest: str
    size: int
    fetched: int = 0  # bytes received over the network for this blob, all attempts together
    resumed_from: int = 0  # bytes a partial file already held when this pull started on it
    attempts: int = 0
    cached: bool = False  # the store already had it: nothing fetched


@dataclass(frozen=True)
class ManifestResponse:
    raw: bytes
    content_type: str | None
    digest_header: str | None


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


class RegistryClient:
    def __init__(
        self,
        registry: str,
        settings: RegistrySettings,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.registry = registry
        self.settings = settings
        self.transport = Transport(registry, settings, sleep=sleep)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- manifests -----------------------------------------------------------------------------
    def get_manifest(self, repository: str, reference: str, limit: int, what: str) -> ManifestResponse:
        resp = self.transport.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scope=pull_scope(repository),
            what=what,
            headers={"Accept": mt.MANIFEST_ACCEPT},
        )
        raw = resp.read_limited(limit, what)
        return ManifestResponse(raw, resp.header("Content-Type"), resp.header("Docker-Content-Digest"))

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str | None:
        resp = self.transport.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scope=push_scope(repository),
            what=f"push manifest {self.registry}/{repository}:{reference}",
            headers={"Content-Type": media_type, "Content-Length": str(len(raw))},
            body=raw,
            ok=(200, 201),
        )
        resp.read_limited(64 * 1024, "manifest push answer")
        return resp.header("Docker-Content-Digest")

    # -- blobs in ------------------------------------------------------------------------------
    def get_blob_bytes(self, repository: str, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (config, signature payload) in memory, checked against its digest."""
        if desc.size > limit:
            raise ImageRefused(f"{what} is {desc.size} bytes, over the limit of {limit}", digest=desc.digest)
        resp = self.transport.request(
            "GET", f"/v2/{repository}/blobs/{desc.digest}", scope=pull_scope(repository), what=what
        )
        data = resp.read_limited(limit, what)
        if sha256_digest(data) != desc.digest:
            raise ImageRefused(
                f"{what} is corrupt or tampered: its content hashes to {sha256_digest(data)}, "
                f"the manifest says {desc.digest}",
                digest=desc.digest,
            )
        if len(data) != desc.size:
            raise ImageRefused(f"{what} is {len(data)} bytes, the manifest says {desc.size}", digest=desc.digest)
        return data

    def fetch_blob(
        self,
        repository: str,
        desc: Descriptor,
        store: BlobStore,
        what: str,
        progress: ProgressSink | None = None,
    ) -> BlobFetch:
        """Stream one blob into ``store``, resuming a partial download, verifying its digest."""
        result = BlobFetch(desc.digest, desc.size)
        if store.has(desc.digest):
            result.cached = True
            if progress is not None:
                progress.advance(desc.size)
            return result
        result.resumed_from = min(store.partial_size(desc.digest), desc.size)
        if progress is not None and result.resumed_from:
            progress.advance(result.resumed_from)
        try:
            return self._fetch(repository, desc, store, what, result, progress)
        except OSError as exc:
            # Network errors became interruptions (and retries) below: this is the local disk.
            raise ImageError(f"cannot store {what} in {store.root}: {exc.strerror or exc}") from exc

    def _fetch(
        self,
        repository: str,
        desc: Descriptor,
        store: BlobStore,
        what: str,
        result: BlobFetch,
        progress: ProgressSink | None,
    ) -> BlobFetch:
        backoff = self.transport.retry_loop(what)
        restarted = False
        while True:
            result.attempts += 1
            offset = store.partial_size(desc.digest)
            if offset > desc.size:
                # More bytes than the blob has: whatever wrote them, they are not this blob.
                store.partial_path(desc.digest).unlink(missing_ok=True)
                offset = 0
            try:
                if offset < desc.size or desc.size == 0:
                    writer = self._download(repository, desc, store, offset, what, result, progress)
                else:
                    # A complete partial left by an earlier run: only its hash is left to check.
                    writer = BlobSink(store, desc.digest, resume=True)
            except _Interrupted as exc:
                self.transport.wait_or_fail(backoff, what, exc.reason)
                continue
            try:
                writer.commit()
            except CorruptBlob as exc:
                # The partial is gone now. Once, start over: a proxy or a disk may have garbled it.
                if restarted:
                    raise ImageRefused(f"{what} is corrupt or tampered: {exc}", digest=desc.digest) from exc
                restarted = True
                if progress is not None:
                    progress.advance(-desc.size)
                continue
            return result

    def _download(
        self,
        repository: str,
        desc: Descriptor,
        store: BlobStore,
        offset: int,
        what: str,
        result: BlobFetch,
        progress: ProgressSink | None,
    ) -> BlobSink:
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        resp = self.transport.request(
            "GET",
            f"/v2/{repository}/blobs/{desc.digest}",
            scope=pull_scope(repository),
            what=what,
            headers=headers,
            ok=(200, 206),
        )
        if offset and not _range_honoured(resp, offset):
            # The server sent the whole blob: start the partial over rather than append.
            if progress is not None:
                progress.advance(-offset)
            offset = 0
        writer = BlobSink(store, desc.digest, resume=offset > 0)
        try:
            while True:
                # A fresh buffer per block: the sink's writer thread still holds the previous ones.
                view = memoryview(bytearray(READ_BLOCK))
                try:
                    n = resp.readinto(view)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(_reason(exc)) from exc
                if not n:
                    break
                if writer.size + n > desc.size:
                    writer.abort(keep_partial=False)
                    raise ImageRefused(
                        f"{what}: the registry sent more than the {desc.size} bytes the manifest says",
                        digest=desc.digest,
                    )
                writer.write(view[:n])
                result.fetched += n
                if progress is not None:
                    progress.advance(n)
            if writer.size < desc.size:
                raise _Interrupted(f"connection ended after {writer.size} of {desc.size} bytes")
        except BaseException:
            writer.abort(keep_partial=True)  # the bytes so far stay for a resume
            raise
        finally:
            resp.close()
        return writer

    # -- blobs out -----------------------------------------------------------------------------
    def blob_exists(self, repository: str, digest: str, scope: str | None = None) -> bool:
        resp = self.transport.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scope=scope or pull_scope(repository),
            what=f"check blob {digest}",
            ok=(200, 404),
        )
        resp.close()
        return resp.status == 200

    def push_blob(self, repository: str, desc: Descriptor, body: bytes | Callable[[], BinaryIO]) -> bool:
        """Upload a blob unless the repository has it; returns whether bytes were sent."""
        scope = push_scope(repository)
        if self.blob_exists(repository, desc.digest, scope):
            return False
        what = f"push blob {desc.digest} to {self.registry}/{repository}"
        start = self.transport.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scope=scope,
            what=what,
            ok=(202,),
            headers={"Content-Length": "0"},
            body=b"",
        )
        start.read_limited(64 * 1024, "upload start answer")
        location = start.header("Location")
        if not location:
            raise RegistryError(f"{what}: the registry gave no upload location")
        url = urljoin(self.transport.base + "/", location)
        url += ("&" if "?" in url else "?") + urlencode({"digest": desc.digest})
        done = self.transport.request(
            "PUT",
            url,
            scope=scope,
            what=what,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
            body=body,
            ok=(201,),
            retry=False,  # an upload session is spent by a failed PUT; the caller starts over
        )
        done.read_limited(64 * 1024, "upload answer")
        return True


class _Interrupted(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _range_honoured(resp: Response, offset: int) -> bool:
    if resp.status != 206:
        return False
    content_range = resp.header("Content-Range") or ""
    # "bytes <first>-<last>/<size>"
    try:
        first = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    return first == offset


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "stalled: no data within the stall timeout"
    return f"{type(exc).__name__}: {exc}"
