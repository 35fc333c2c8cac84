from fleetlog import Fleet


async def test_record_flush_query(fleet: Fleet) -> None:
    r = fleet.attempts.record(agent="alpha", action="probe", outcome="success", elapsed_s=1.5, extras={"polls": 4})
    token = await fleet.flush()
    assert r.position is not None
    page = await fleet.attempts.query(agent="alpha", min_seq=token)
    assert [row.id for row in page.items] == [r.id]
    assert page.as_of["FLEET_ATTEMPTS"] >= r.position.seq
