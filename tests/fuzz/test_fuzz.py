"""The fast slice of the fuzz campaign (``python -m tests.fuzz --cases 10000`` runs it all): 50 seeded
cases of each family, each bounded in time in a worker process; none may end in a traceback, a hang, a
read outside a model folder or a silently wrong result."""

from __future__ import annotations

from tests.fuzz.__main__ import FAMILIES
from tests.fuzz.harness import BAD, Tally, campaign

SLICE = 50


def test_fast_slice_of_every_family(tmp_path):
    tally = Tally()
    for outcome in campaign([(f, s) for s in range(SLICE) for f in FAMILIES], workers=2, timeout=60,
                            root=tmp_path):
        tally.add(outcome)
    report = "\n".join(f"{o.kind}: {o.family} seed {o.seed}: {o.what}\n{o.detail}" for o in tally.bad)
    assert not tally.bad, report
    assert {f: sum(c.values()) for f, c in tally.counts.items()} == {f: SLICE for f in FAMILIES}
    # the slice exercises both ends: clean refusals, and results checked against a reference reader
    assert sum(c["error"] for c in tally.counts.values()) > SLICE
    assert sum(c["ok-verified"] for c in tally.counts.values()) > 0
    assert all(k not in BAD for c in tally.counts.values() for k in c)
