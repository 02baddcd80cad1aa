"""Outbox delivery records: written atomically, read back per destination."""

from __future__ import annotations

from osteonode.outbox import delivery_state, delivery_states, outbox_entry, record_delivery


def test_delivery_records_round_trip(tmp_path):
    entry = outbox_entry(tmp_path, "1.2.3")
    entry.mkdir()
    assert delivery_state(entry, "pacs") is None
    record_delivery(entry, "pacs", "pending", 1, "no answer")
    record_delivery(entry, "archive", "delivered", 2)
    (entry / "delivery-broken.json").write_text("{not json")
    assert delivery_state(entry, "pacs") == {"destination": "pacs", "state": "pending", "attempts": 1,
                                             "detail": "no answer"}
    assert {name: r["state"] for name, r in delivery_states(entry).items()} == {"pacs": "pending",
                                                                               "archive": "delivered"}
