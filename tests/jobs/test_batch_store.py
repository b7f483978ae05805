"""The store interface batches are claimed through: atomic across connections (as replicas
sharing a database would be), progress only from the owner, a cancel kept over a late start."""

from __future__ import annotations

import tempfile
import threading

from ferroserve.gateway.store import Store


def _batch(i: int) -> dict:
    return {"id": f"b{i:03d}", "workspace": "w", "kind": "embeddings", "status": "validating", "endpoint": "/v1/embeddings",
            "model": "m", "input_path": f"batches/b{i}.in.jsonl", "total": 10, "created_at": float(i)}


def test_concurrent_claims_never_take_the_same_batch():
    data_dir = tempfile.mkdtemp(prefix="ferroserve-claims-")
    seed = Store(data_dir)
    for i in range(60):
        seed.insert_batch(_batch(i))
    claimed: dict[str, list[str]] = {}

    def claimer(owner: str) -> None:
        store = Store(data_dir)
        got = claimed.setdefault(owner, [])
        while rows := store.claim("batches", owner, 100.0, 50.0, 3):
            got += [r["id"] for r in rows]
        store.close()

    threads = [threading.Thread(target=claimer, args=(f"p{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [b for ids in claimed.values() for b in ids]
    assert sorted(every) == [f"b{i:03d}" for i in range(60)]  # each exactly once
    # A live owner's rows are not claimable; a silent one's are.
    assert seed.claim("batches", "late", 101.0, 99.0, 100) == []
    assert len(seed.claim("batches", "late", 200.0, 150.0, 100)) == 60


def test_progress_is_the_owners_and_a_cancel_survives_the_start():
    store = Store(tempfile.mkdtemp(prefix="ferroserve-claims-"))
    store.insert_batch(_batch(1))
    [row] = store.claim("batches", "a", 1.0, 0.0, 1)
    assert store.cancel_batch(row["id"], "w", "embeddings", 2.0)["status"] == "cancelling"
    # The owner's first commit would begin the batch; the cancel is kept.
    assert store.batch_progress(row["id"], "a", {"status": "in_progress", "completed": 3}, 3.0) == "cancelling"
    assert store.batch_progress(row["id"], "b", {"completed": 4}, 3.0) is None
    assert store.get_batch(row["id"], "w", "embeddings")["completed"] == 3
    assert store.get_batch(row["id"], "other", "embeddings") is None
    assert store.finish_batch(row["id"], "a", {"status": "cancelled", "cancelled_at": 4.0}, [])
    assert store.beat("batches", "a", 5.0) == set()
