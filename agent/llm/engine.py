"""One loaded language model version: its llama.cpp contexts and the worker threads that generate.

A context (``llama_cpp.Llama`` on the version's GGUF blob, memory-mapped) is made on first use, on
a worker thread, never at load and never on the event loop; up to ``slots`` of them, one per
generation running at once (the admission limit), each used by one thread at a time. They are
closed with the version (``LoadedModel.closers``); a generation still running then is stopped at
its next token and its context closed when it returns.

Chat messages become the prompt by the model's own chat template, as llama-cpp-python's
``create_chat_completion`` renders it (the GGUF's ``tokenizer.chat_template``), so an answer here
is token for token the one llama-cpp-python gives for the same messages and sampling arguments.

Stopping a generation: llama.cpp's token loop calls a request's stopping criteria once per sampled
token; each generation adds one that reads its :class:`Job`'s cancel flag (and counts the tokens),
so a client that goes away costs at most one more token. ``create_chat_completion`` does not pass
stopping criteria through to the ``create_completion`` call its chat handler makes, so the context
class adds the job's there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.llm.channel import ChunkChannel
from agent.llm.options import LlamaOptions
from agent.llm.params import GenerationRequest
from agent.wasinn.abi import ExecutionTarget

if TYPE_CHECKING:
    from llama_cpp import Llama

    from agent.wasinn.gpu import GpuLease

log = structlog.get_logger("edge_agent.llm")


class ContextOverflow(ValueError):
    """The prompt does not fit the model's context (llama.cpp's own check): the request's fault, 400."""


@dataclass(eq=False)  # by identity: engines keep their running jobs in a set
class Job:
    """One generation: what to run, where its chunks go (streaming), and its cancel flag."""

    request: GenerationRequest
    kwargs: dict[str, Any]
    channel: ChunkChannel | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the worker: tokens sampled, tokens of the prompt, and the finish reason it ended with.
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None

    def cancel(self) -> None:
        """Stop at the next token (thread-safe); a worker blocked on a slow reader wakes up."""
        self.cancelled.set()
        if self.channel is not None:
            self.channel.close()

    def token_hook(self, input_ids: np.ndarray, _logits: np.ndarray) -> bool:
        """llama.cpp's stopping criterion, once per sampled token: True stops the generation."""
        # input_ids holds the prompt and the tokens sampled before this one: the first call's
        # length is the prompt's; each later call's one more (the last, after the loop, repeats it).
        n = len(input_ids)
        if self.prompt_tokens == 0:
            self.prompt_tokens = n
        self.tokens = n - self.prompt_tokens + 1
        return self.cancelled.is_set()


class LlmEngine:
    """A version's contexts and generation threads. ``run`` is called on the event loop and returns a future."""

    def __init__(
        self,
        *,
        label: str,
        model_name: str,
        model_path: Path,
        options: LlamaOptions,
        slots: int,
        on_tokens: Callable[[int], None],
        gpu_lease: GpuLease | None = None,
        target: ExecutionTarget = ExecutionTarget.AUTO,
    ):
        self.label = label
        self.model_name = model_name
        self.model_path = model_path
        self.options = options
        self.slots = slots
        self._on_tokens = on_tokens
        # -- GPU placement (agent/wasinn/gpu.py): the version's lease from its admission at load (None:
        # the CPU, or no scheduler) and the target admission left it (``auto`` without a lease: ``cpu``).
        self.gpu_lease = gpu_lease
        self.target = target
        self._said_cpu = False  # the "leased, but this llama.cpp cannot offload" line is logged once
        # -- end GPU placement
        self._idle: list[Llama] = []
        self._made = 0
        self._active: set[Job] = set()
        self._closed = False
        self._lock = threading.Lock()
        self._llama_cls: type[Llama] | None = None
        # Generation blocks a thread for as long as it runs: threads of its own, not the agent's
        # inference workers, which fast models need.
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"llm-{model_name}"[:15])

    @property
    def contexts(self) -> int:
        """Contexts made and not closed."""
        return self._made

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, job: Job) -> Future[dict[str, Any] | None]:
        """Generate on a worker thread: the completion (non-streaming), or None once its chunks are all put."""
        return self._executor.submit(self._generate, job)

    # -- the worker thread ---------------------------------------------------------------------------
    def _generate(self, job: Job) -> dict[str, Any] | None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.label} is unloaded")
            self._active.add(job)
        try:
            if job.cancelled.is_set():  # the client left while it waited for the thread
                job.finish_reason = "stop"
                return None
            # A leased version holds a slot of its device for the whole generation (GpuBusy past
            # [gpu] wait_s): [gpu] max_concurrency bounds generations and WASI-NN computes together,
            # and the time is the version's GPU time. The context is made inside it: that loads layers.
            with self._gpu_slot():
                if job.cancelled.is_set():  # the client left while it waited for the device
                    job.finish_reason = "stop"
                    return None
                llama = self._checkout()
                try:
                    return self._call(llama, job)
                finally:
                    self._checkin(llama)
        finally:
            with self._lock:
                self._active.discard(job)
            self._on_tokens(job.tokens)

    @contextlib.contextmanager
    def _gpu_slot(self) -> Iterator[None]:
        """The lease's compute slot (GpuBusy past [gpu] wait_s); nothing without a live lease."""
        with contextlib.ExitStack() as stack:
            lease = self.gpu_lease
            if lease is not None and not lease.released:
                # ValueError: released since it was looked at (a CPU-only ggml graph gave it back).
                with contextlib.suppress(ValueError):
                    stack.enter_context(lease.compute())
            yield

    def _call(self, llama: Llama, job: Job) -> dict[str, Any] | None:
        request = job.request
        setattr(llama, "job", job)  # noqa: B010 - read by the context class's create_completion
        try:
            try:
                result: Any
                if request.kind == "chat":
                    result = llama.create_chat_completion(
                        messages=request.messages,  # type: ignore[arg-type]
                        stream=request.stream,
                        model=request.model,
                        **job.kwargs,
                    )
                else:
                    result = llama.create_completion(
                        prompt=request.prompt, stream=request.stream, model=request.model, **job.kwargs
                    )
                if not request.stream:
                    assert isinstance(result, dict)
                    job.finish_reason = result["choices"][0].get("finish_reason")
                    return result
                assert job.channel is not None
                for chunk in _iterate(result):
                    reason = chunk["choices"][0].get("finish_reason") if chunk.get("choices") else None
                    if reason is not None:
                        job.finish_reason = reason
                    if not job.cancelled.is_set():
                        job.channel.put(chunk)
                    # Once cancelled, the generator ends at the next token (the stopping criterion).
                return None
            except ValueError as exc:
                if "exceed context window" in str(exc):
                    raise ContextOverflow(str(exc)) from None
                raise
        finally:
            setattr(llama, "job", None)  # noqa: B010

    def _checkout(self) -> Llama:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._make()
        except BaseException:
            with self._lock:
                self._made -= 1
            raise

    def _checkin(self, llama: Llama) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(llama)
                return
            self._made -= 1
        llama.close()

    def _make(self) -> Llama:
        import llama_cpp

        opts = self.options
        cls = self._context_class()
        offload = bool(llama_cpp.llama_supports_gpu_offload())
        lease = self.gpu_lease
        if lease is not None and not lease.released and not offload:
            with self._lock:
                said, self._said_cpu = self._said_cpu, True
            if not said:
                log.warning(
                    "language model runs on the CPU: this llama.cpp build has no GPU offload",
                    model=self.label,
                    leased=lease.device,
                )
        placed = context_params(opts, lease=lease, target=self.target, offload=offload)
        log.info("language model context made", model=self.label, n_ctx=opts.n_ctx, gpu_layers=placed["n_gpu_layers"])
        return cls(
            model_path=str(self.model_path),
            n_ctx=opts.n_ctx,
            n_batch=min(opts.n_batch, opts.n_ctx),
            n_threads=opts.n_threads,
            use_mmap=opts.use_mmap,
            verbose=False,
            **placed,
        )

    def _context_class(self) -> type[Llama]:
        with self._lock:
            if self._llama_cls is None:
                self._llama_cls = context_class()
            return self._llama_cls

    # -- closing ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """The version is unloaded: running generations stop at their next token; idle contexts close now."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            self._made -= len(idle)
            active = list(self._active)
        for job in active:
            job.cancel()
        for llama in idle:
            llama.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- GPU placement of a context -----------------------------------------------------------------------
SPLIT_MODE_NONE = 0  # llama_cpp.LLAMA_SPLIT_MODE_NONE: every offloaded layer on main_gpu, no other device


def context_params(
    options: LlamaOptions, *, lease: GpuLease | None, target: ExecutionTarget, offload: bool
) -> dict[str, Any]:
    """The GPU arguments of a ``Llama`` context: ``n_gpu_layers``, ``main_gpu`` and, on a lease, ``split_mode``.

    A live lease: ``n-gpu-layers`` layers on the leased device alone (as the ggml WASI-NN backend places
    its graphs), when this llama.cpp can offload at all (``offload``), else none. No lease where the
    scheduler placed the version (``target`` cpu, ``auto`` that fell back, or a lease given back): none,
    the backend must not take a GPU the scheduler did not give. A version no scheduler placed (``auto``
    or ``gpu`` kept): the model's own ``n-gpu-layers`` and ``main-gpu``.
    """
    if lease is not None and not lease.released:
        layers = options.n_gpu_layers if offload else 0
        if layers == 0:
            return {"n_gpu_layers": 0, "main_gpu": options.main_gpu}
        return {"n_gpu_layers": layers, "main_gpu": lease.index, "split_mode": SPLIT_MODE_NONE}
    if lease is not None or target is ExecutionTarget.CPU:
        return {"n_gpu_layers": 0, "main_gpu": options.main_gpu}
    return {"n_gpu_layers": options.n_gpu_layers if offload else 0, "main_gpu": options.main_gpu}


# -- end GPU placement


def _iterate(result: Any) -> Iterator[dict[str, Any]]:
    yield from result


def context_class() -> type[Llama]:
    """``Llama`` whose ``create_completion`` adds the running job's stopping criterion (see the module doc)."""
    from llama_cpp import Llama, StoppingCriteriaList

    class _Context(Llama):
        job: Job | None = None

        def create_completion(self, *args: Any, **kwargs: Any) -> Any:
            job = self.job
            if job is not None:
                given = kwargs.get("stopping_criteria") or []
                kwargs["stopping_criteria"] = StoppingCriteriaList([job.token_hook, *given])
            return super().create_completion(*args, **kwargs)

    return _Context
