"""Races on an institution's own files: the report-signing key made on first use and the
noise-derivation cache. Threads of one process share a pid, so a temporary name made of the
pid alone was shared too: two threads making the key at once could crash, or leave one
thread's public key beside another's private key; two writers of the noise cache could move
each other's half-written file into place."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ferry.client import receipts, runtime
from ferry.client.runtime import RoundRequest
from ferry.common.config import RunConfig
from ferry.common.privacy.report import load_private_key, public_key_text

THREADS = 8


def _together(target, *args) -> list[BaseException]:
    """Run ``target(i, *args)`` in THREADS threads released at the same instant; their errors."""
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            target(i, *args)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("attempt", range(5))
def test_threads_making_the_signing_key_at_once_all_load_one_key_whose_public_half_matches(
    attempt, tmp_path
):
    state = tmp_path / "state"
    keys: dict[int, bytes] = {}

    def make_and_load(i: int) -> None:
        key = receipts.signing_key(state, "hospital-a")
        keys[i] = public_key_text(key.public_key())

    assert _together(make_and_load) == []
    assert len(set(keys.values())) == 1, "threads signed with different keys"
    on_disk = load_private_key((state / receipts.LOCAL_KEY).read_bytes())
    pub = (state / receipts.LOCAL_PUB).read_bytes()
    assert pub.startswith(public_key_text(on_disk.public_key()))
    assert pub.split()[:2] == keys[0].split()[:2]
    assert (state / receipts.LOCAL_KEY).stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in state.iterdir()) == [receipts.LOCAL_KEY, receipts.LOCAL_PUB]


def test_an_existing_signing_key_is_never_replaced(tmp_path):
    first = receipts.signing_key(tmp_path, "hospital-a")
    receipts._make_local_key(tmp_path, "hospital-a")  # a late concurrent maker
    again = receipts.signing_key(tmp_path, "hospital-a")
    assert public_key_text(first.public_key()) == public_key_text(again.public_key())


@pytest.mark.parametrize("attempt", range(3))
def test_threads_deriving_noise_at_once_leave_one_readable_cache(attempt, tmp_path, monkeypatch):
    """Each thread derives sigma for another epsilon and writes the cache at the same time."""
    monkeypatch.setattr(runtime, "noise_multiplier_for_target", lambda eps, *a: 1.0 / eps)

    def derive(i: int) -> None:
        run = RunConfig(epsilon=1.0 + i, batch_size=10)
        runtime.noise_for(RoundRequest(run, 1, "x" * 64, 2), 1000, tmp_path)

    assert _together(derive) == []
    cache = json.loads((tmp_path / "noise_cache.json").read_text())
    assert cache and all(isinstance(v, float) for v in cache.values())
    assert not list(Path(tmp_path).glob("*.tmp"))
