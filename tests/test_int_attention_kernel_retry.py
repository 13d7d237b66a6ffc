"""The fused-attention kernel's build failure is remembered, but not for the whole process:
``load_kernel`` builds again when asked, when the build environment changes, or after a
back-off (fxquant/runtime/int_attention.py, ``_Kernel``). The builder is replaced by a fake
that fails first and then succeeds; nothing is compiled."""

from __future__ import annotations

import pytest

import fxquant.runtime.int_attention as ia


class FlakyBuild:
    """Fails ``failures`` times (a lock held by another build, say), then succeeds."""

    def __init__(self, failures: int = 1):
        self.calls, self.failures = 0, failures

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("ninja: error: build.ninja.lock is held by another process")


@pytest.fixture
def kernel(monkeypatch):
    """A fresh kernel state on an x86-64 machine where the op is not registered yet."""
    for name, value in dict(
        tried=False, ready=False, error=None, attempts=0, failed_at=None, failed_env=None, permanent=False
    ).items():
        monkeypatch.setattr(ia._Kernel, name, value)
    monkeypatch.setattr(ia, "_registered", lambda: False)
    monkeypatch.setattr(ia.platform, "machine", lambda: "x86_64")
    clock = [1000.0]
    monkeypatch.setattr(ia.time, "monotonic", lambda: clock[0])
    build = FlakyBuild()
    monkeypatch.setattr(ia, "_build", build)
    return build, clock


def test_a_failure_is_remembered_with_its_cause_then_retried_on_request(kernel):
    build, _ = kernel
    assert not ia.load_kernel() and build.calls == 1
    assert "attempt 1" in ia.kernel_error() and "lock is held" in ia.kernel_error()
    assert not ia.kernel_ready()
    assert not ia.load_kernel() and build.calls == 1  # remembered: no rebuild on every call
    assert ia.load_kernel(retry=True) and build.calls == 2
    assert ia.kernel_ready() and ia.kernel_error() is None
    assert ia.load_kernel(retry=True) and build.calls == 2  # ready: never rebuilt


def test_a_changed_build_environment_retries(kernel, monkeypatch):
    build, _ = kernel
    monkeypatch.setattr(ia, "build_environment", lambda: ("/usr/bin", "", "", None, None))
    assert not ia.load_kernel()
    monkeypatch.setattr(ia, "build_environment", lambda: ("/usr/bin", "", "", "/usr/bin/c++", None))  # installed
    assert ia.load_kernel() and build.calls == 2


def test_the_back_off_retries_later_and_doubles(kernel, monkeypatch):
    build, clock = kernel
    build.failures = 2
    assert not ia.load_kernel()
    clock[0] += ia.retry_delay(1) - 1
    assert not ia.load_kernel() and build.calls == 1  # too early
    assert not ia.needs_build() and build.calls == 1  # not due: nothing to build yet, and it never builds
    clock[0] += 1
    assert not ia.load_kernel() and build.calls == 2  # due: tried, failed again
    assert "attempt 2" in ia.kernel_error() and ia.retry_delay(2) == 2 * ia.retry_delay(1)
    clock[0] += ia.retry_delay(1)
    assert not ia.load_kernel() and build.calls == 2  # the second back-off is longer
    clock[0] += ia.retry_delay(2)
    assert ia.load_kernel() and build.calls == 3
    assert ia.retry_delay(100) == ia.RETRY_DELAY_MAX_S


def test_an_unsupported_cpu_is_not_retried(kernel, monkeypatch):
    build, clock = kernel
    monkeypatch.setattr(ia.platform, "machine", lambda: "aarch64")
    assert not ia.load_kernel() and "x86-64" in ia.kernel_error()
    clock[0] += 10 * ia.RETRY_DELAY_MAX_S
    assert not ia.load_kernel(retry=True) and build.calls == 0
